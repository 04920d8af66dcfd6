"""Built-in reward functions, each constructed by name with keyword arguments (`reward.kwargs`).

| name           | module      | scores                                                           |
|----------------|-------------|------------------------------------------------------------------|
| `exact_match`  | match.py    | stripped response == prompt.answer                               |
| `regex`        | match.py    | an answer extracted by a pattern == prompt.answer                |
| `math`         | math.py     | math-verify equivalence, in killable worker processes           |
| `code`         | code.py     | model-written Python against tests, in a sandboxed subprocess    |
| `gym`          | gym.py      | a reasoning-gym dataset's own `score_answer(answer, entry)`      |
| `reward_model` | model.py    | an HF sequence classifier, in batches                            |

`transforms.py` holds penalties composable with any of them; `kwargs.py` builds any of them from
config. Machinery: `procpool.py` (killable worker processes; `_math_worker.py` is the math
handler they load) and `sandbox.py` (the parent side of a code run; `_harness.py` is the child
side). Every module here is light to import: math-verify, reasoning-gym, torch and transformers
are imported only when first used.
"""
