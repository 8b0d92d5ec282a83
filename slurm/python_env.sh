# Sourced by slurm/train.sbatch and slurm/debug.sbatch, in the repository's root ($REPO): sets
# PYTHON, the interpreter the job runs. PYTHON as given wins; else VENV's (activated), else the
# repository's .venv, else python3. A VENV or PYTHON that does not exist ends the job at once
# (exit 2) with one line, rather than once per node inside srun.
if [ -n "${VENV:-}" ]; then
    # Sourcing a missing activate ends the job with "line N: ...: No such file or directory".
    if [ ! -f "$VENV/bin/activate" ]; then
        echo "error: VENV=$VENV is not a virtual environment (no $VENV/bin/activate): give the" \
             "path of an existing one (made by bash setup.sh: the repository's .venv) or unset VENV" >&2
        exit 2
    fi
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
PYTHON_GIVEN=${PYTHON:-}
if [ -z "${PYTHON:-}" ]; then
    # VENV names the environment to use: it wins over the repository's .venv.
    if [ -n "${VENV:-}" ]; then
        PYTHON=$VENV/bin/python
    elif [ -x .venv/bin/python ]; then
        PYTHON=$REPO/.venv/bin/python
    else
        PYTHON=python3
    fi
fi
# A mistyped PYTHON would fail in srun, once per node, as "execve(): ...: No such file".
if [ -n "${PYTHON_GIVEN:-}" ] && ! command -v "$PYTHON" >/dev/null; then
    echo "error: PYTHON=$PYTHON is not a python that can run here: set PYTHON to an existing one" \
         "(or unset it for the repository's .venv)" >&2
    exit 2
fi
