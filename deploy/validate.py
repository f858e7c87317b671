#!/usr/bin/env python3
"""Render every kustomize overlay (and each optional component on top of the
overlay it is meant for) with `kubectl kustomize`, then validate every object
offline against the Kubernetes OpenAPI schemas shipped by the
`kubernetes-validate` package, in strict mode (unknown fields are errors).

Why strict and offline: a typo such as `tolerations.operater` is silently
dropped by the API server and only shows when a node's proxy is missing. No
cluster is needed, so CI catches it.

cert-manager and Prometheus Operator kinds are custom resources whose schemas
kubernetes-validate does not ship; they are checked against the subset of
their upstream CRD schemas that these manifests use (CRD_SCHEMAS below),
also with unknown fields refused.

Usage: python3 deploy/validate.py [--kubectl PATH] [--kubernetes-version V]
       [--out DIR]   (write each rendering to DIR/<name>.yaml)
Exit status 0 when every object of every rendering is valid.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

DEPLOY = os.path.dirname(os.path.abspath(__file__))
# The Kubernetes minor the project builds against (k8s-openapi feature v1_35).
DEFAULT_VERSION = "1.35.0"

# Optional components, and the overlay each one is rendered on top of.
COMPONENTS = {
    "servicemonitor": "replace-kube-proxy",
    "cert-manager": "hybrid",
}


def _strict(properties, required=()):
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_STR = {"type": "string"}
_META = {
    "type": "object",
    "properties": {
        "name": _STR,
        "namespace": _STR,
        "labels": {"type": "object", "additionalProperties": _STR},
        "annotations": {"type": "object", "additionalProperties": _STR},
    },
    "required": ["name"],
    "additionalProperties": False,
}


def _crd(api_version, kind, spec):
    return _strict(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
        required=["apiVersion", "kind", "metadata", "spec"],
    )


# Subsets of cert-manager.io/v1 and monitoring.coreos.com/v1 CRD schemas:
# exactly the fields these manifests may use, with the upstream types/enums.
CRD_SCHEMAS = {
    ("cert-manager.io/v1", "Issuer"): _crd(
        "cert-manager.io/v1",
        "Issuer",
        _strict({"selfSigned": _strict({"crlDistributionPoints": {"type": "array", "items": _STR}})},
                required=["selfSigned"]),
    ),
    ("cert-manager.io/v1", "Certificate"): _crd(
        "cert-manager.io/v1",
        "Certificate",
        _strict(
            {
                "secretName": _STR,
                "duration": _STR,
                "renewBefore": _STR,
                "commonName": _STR,
                "dnsNames": {"type": "array", "items": _STR, "minItems": 1},
                "isCA": {"type": "boolean"},
                "privateKey": _strict(
                    {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    }
                ),
                "usages": {
                    "type": "array",
                    "items": {
                        "enum": [
                            "signing", "digital signature", "content commitment",
                            "key encipherment", "key agreement", "data encipherment",
                            "cert sign", "crl sign", "encipher only", "decipher only",
                            "any", "server auth", "client auth", "code signing",
                            "email protection", "s/mime", "ipsec end system",
                            "ipsec tunnel", "ipsec user", "timestamping",
                            "ocsp signing", "microsoft sgc", "netscape sgc",
                        ]
                    },
                },
                "issuerRef": _strict(
                    {"name": _STR, "kind": _STR, "group": _STR}, required=["name"]
                ),
            },
            required=["secretName", "issuerRef"],
        ),
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _strict(
            {
                "selector": _strict(
                    {"matchLabels": {"type": "object", "additionalProperties": _STR}}
                ),
                "namespaceSelector": _strict(
                    {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STR}}
                ),
                "endpoints": {
                    "type": "array",
                    "items": _strict(
                        {
                            "port": _STR,
                            "path": _STR,
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "relabelings": {
                                "type": "array",
                                "items": _strict(
                                    {
                                        "sourceLabels": {"type": "array", "items": _STR},
                                        "targetLabel": _STR,
                                        "regex": _STR,
                                        "replacement": _STR,
                                        "action": _STR,
                                    }
                                ),
                            },
                        }
                    ),
                },
            },
            required=["selector", "endpoints"],
        ),
    ),
}


def find_kubectl(explicit):
    path = explicit or shutil.which("kubectl")
    if not path:
        sys.exit(
            "validate.py: kubectl not found (needed for `kubectl kustomize`); "
            "install it (.ci/run does) or pass --kubectl PATH"
        )
    return path


def render(kubectl, directory):
    proc = subprocess.run(
        [kubectl, "kustomize", directory], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{proc.stderr.strip()}")
    return proc.stdout


def renderings(kubectl, tmp):
    """(name, rendered YAML) for every overlay and component composition."""
    overlays_dir = os.path.join(DEPLOY, "overlays")
    overlays = sorted(
        d
        for d in os.listdir(overlays_dir)
        if os.path.isfile(os.path.join(overlays_dir, d, "kustomization.yaml"))
    )
    if not overlays:
        raise RuntimeError(f"no overlays under {overlays_dir}")
    for name in overlays:
        yield name, render(kubectl, os.path.join(overlays_dir, name))
    for component, overlay in sorted(COMPONENTS.items()):
        if overlay not in overlays:
            raise RuntimeError(f"component {component}: overlay {overlay} does not exist")
        work = os.path.join(tmp, f"{overlay}+{component}")
        os.makedirs(work)
        with open(os.path.join(work, "kustomization.yaml"), "w") as f:
            f.write(
                "apiVersion: kustomize.config.k8s.io/v1beta1\n"
                "kind: Kustomization\n"
                f"resources:\n  - {os.path.relpath(os.path.join(overlays_dir, overlay), work)}\n"
                f"components:\n  - {os.path.relpath(os.path.join(DEPLOY, 'components', component), work)}\n"
            )
        yield f"{overlay}+{component}", render(kubectl, work)


def validate_doc(doc, version):
    """Returns None when valid, else a one-line reason."""
    import jsonschema
    import kubernetes_validate

    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        return "not a Kubernetes object (no apiVersion/kind)"
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        try:
            jsonschema.validate(doc, CRD_SCHEMAS[key])
        except jsonschema.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path)
            return f"{path or '(root)'}: {e.message}"
        return None
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return f"no schema for {key[0]} {key[1]} (add it to CRD_SCHEMAS if it is a custom resource)"
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return f"{path or '(root)'}: {e.message}"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kubectl")
    ap.add_argument("--kubernetes-version", default=DEFAULT_VERSION)
    ap.add_argument("--out", help="write each rendering to OUT/<name>.yaml")
    args = ap.parse_args()
    try:
        import yaml  # noqa: F401  (ships with kubernetes-validate)
        import jsonschema  # noqa: F401
        import kubernetes_validate  # noqa: F401
    except ImportError as e:
        sys.exit(
            f"validate.py: {e}; install with `python3 -m pip install kubernetes-validate` "
            "(.ci/run does)"
        )
    import yaml

    kubectl = find_kubectl(args.kubectl)
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="lp-kustomize-") as tmp:
        for name, text in renderings(kubectl, tmp):
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, f"{name}.yaml"), "w") as f:
                    f.write(text)
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
            if not docs:
                print(f"FAIL {name}: rendered no objects")
                failed += 1
                continue
            for doc in docs:
                meta = doc.get("metadata", {}) if isinstance(doc, dict) else {}
                ident = f"{doc.get('kind', '?') if isinstance(doc, dict) else '?'}/{meta.get('name', '?')}"
                reason = validate_doc(doc, args.kubernetes_version)
                if reason:
                    print(f"FAIL {name} {ident}: {reason}")
                    failed += 1
                else:
                    print(f"ok   {name} {ident}")
                    passed += 1
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
