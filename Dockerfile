# The one image of the production stack (docker-compose.yml): the dispatcher, the Ray head and the
# Ray GPU workers all run it, so every Ray node has the same Python, Ray and torch (Ray requires
# matching versions across a cluster). See docs/deployment.md.
FROM python:3.11-slim

# git: the fetch stage clones repositories. tini comes from compose's `init: true`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first, from pyproject.toml alone, so code changes do not reinstall torch. On Linux
# x86_64, PyPI's torch wheel is the CUDA build (it brings its CUDA libraries; the host needs only
# the NVIDIA driver and the NVIDIA Container Toolkit). constraints.txt is not used here: it pins
# the CPU wheel of our CPU-only test machines.
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself (see .dockerignore for what stays out: .env, .git, venvs, data), with a C
# compiler for the corpus builder's C extension (workers/corpus/native/; without it the builder
# runs ~1.6x slower), removed again in the same layer. The build fails if the extension is not
# there: the check runs from / so that it imports the installed package, not /src.
COPY . /src
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir --no-deps /src \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && cd / && python -c "from workers.corpus.textscan import NATIVE; assert NATIVE, 'C extension not built'" \
    && install -m 0755 /src/deploy/gpu_worker.py /usr/local/bin/charforge-gpu-worker \
    && useradd --create-home --uid 1000 charforge \
    && install -d -o charforge -g charforge /var/lock/charforge-gpus

ENV PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER charforge
WORKDIR /home/charforge
CMD ["charforge", "--help"]
