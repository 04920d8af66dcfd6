"""Ray lives here (and in the controller): start or join a cluster, make plain classes actors."""
