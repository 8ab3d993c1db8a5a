"""gpool: sweeps that answer "global average or global max pooling for my convnet?".

Importing the package imports nothing else: `gpool.stats` loads no Hydra, a plugin module
no torch (docs/development.md, the code map).
"""

from pathlib import Path

#: The checkout that holds conf/ and runs/; outputs land here whatever the job's cwd is.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
