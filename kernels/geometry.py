"""Fixed facts of the architecture that the kernels and the model share (v4-architecture.md,
design.md "State and pools"). They live here, at the bottom of `cluster -> workers -> kernels`,
so both sides read one definition.

A layer kind is named by its compress ratio: how many token positions one compressed entry covers.
"""

SWA, CSA, HCA = 0, 4, 128  # sliding window only; compressed sparse attention; heavily compressed attention
BLOCK = 256  # positions per logical cache block of every layer kind (a multiple of CSA and HCA)
SWA_PAGE = 64  # positions per sliding-window page
