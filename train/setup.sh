# Sourced by train/demo.sh and tests/run.sh: make the environment on a fresh machine, idempotently.
#   - .venv with the pinned requirements and this project (editable)
#   - Fashion-MNIST from Debian's package dataset-fashion-mnist when apt and root are there
# Set FASHION_MNIST_DIR to use the four IDX files from another folder.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed; set PYTHON=")'
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then  # missing, or left broken by a failed attempt
  rm -rf .venv
  echo "[setup] creating .venv with $("$PY" --version)"
  if ! "$PY" -m venv .venv; then
    rm -rf .venv
    echo "[setup] '$PY -m venv' failed: install your Python's venv module (Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
fi
STAMP=.venv/.requirements.sha
WANT="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing requirements.txt (torch's CUDA build is about 3 GB; a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$WANT" > "$STAMP"
fi
export PATH="$REPO/.venv/bin:$PATH"

export FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ ! -e "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ] && [ ! -e "$FASHION_MNIST_DIR/train-images-idx3-ubyte" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian's dataset-fashion-mnist"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  elif command -v apt-get >/dev/null && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  fi
fi
if [ ! -e "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ] && [ ! -e "$FASHION_MNIST_DIR/train-images-idx3-ubyte" ]; then
  cat >&2 <<MSG
Fashion-MNIST is not in $FASHION_MNIST_DIR and could not be installed (apt-get or root is missing).
Get the four IDX files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
t10k-labels-idx1-ubyte.gz (github.com/zalandoresearch/fashion-mnist, folder data/fashion) into one folder, then:
    FASHION_MNIST_DIR=/that/folder bash train/demo.sh      (the demo passes it on as --data-dir)
    FASHION_MNIST_DIR=/that/folder bash tests/run.sh
MSG
  exit 1
fi

# The BERT demo corpus (train/bert.py, train/text.py): Debian's python3.11-doc, the reStructuredText sources of the
# Python 3.11 documentation (497 files, about 11 MB of English prose). Set BERT_CORPUS_DIR to use another folder.
BERT_CORPUS_DIR="${BERT_CORPUS_DIR:-/usr/share/doc/python3.11/html/_sources}"
if [ ! -d "$BERT_CORPUS_DIR" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian's python3.11-doc (the BERT demo corpus)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc >/dev/null
  elif command -v apt-get >/dev/null && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc
  fi
fi
if [ ! -d "$BERT_CORPUS_DIR" ]; then
  echo "[setup] WARNING: the BERT demo corpus is not in $BERT_CORPUS_DIR (apt-get install python3.11-doc, or set" \
       "BERT_CORPUS_DIR to a folder of text files); train/bert.py and tests/test_bert.py need it" >&2
fi
export BERT_CORPUS_DIR
