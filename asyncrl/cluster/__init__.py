"""Ray lives here (and in the controller): cluster start/connect and turning plain classes into actors."""
