"""`python -m lmobj_kernels.train ...` and `torchrun --nproc-per-node N -m lmobj_kernels.train ...`."""

import sys

from lmobj_kernels.train.loop import main

sys.exit(main())
