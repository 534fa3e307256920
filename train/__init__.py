"""Running the experiments: config resolution, data, models, the engine, the loop's parts and the entry points.

``REPO`` is the checkout's root, the one place analysis/, benchmarks/ and tests/ find ds_configs/ and the entry
points from. (A script run by its path, ``python train/imagenet.py``, puts the root on ``sys.path`` itself before
it can import this.)
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
