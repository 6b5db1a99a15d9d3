"""Reads every kustomization under a directory and prints, as one JSON object, what the
deployment test checks: each kustomization's resources (and those that do not exist), the
YAML documents of every resource file, and the manifest files no kustomization lists.

    python3 k8s_manifests.py deploy/kubernetes

PyYAML comes with kubernetes-validate, which the same test runs.
"""

import json
import os
import sys

import yaml


def main(root: str) -> None:
    root = os.path.abspath(root)
    kustomizations = []
    files = []  # resource files, in the order first listed
    for directory, _dirs, names in sorted(os.walk(root)):
        if "kustomization.yaml" not in names:
            continue
        path = os.path.join(directory, "kustomization.yaml")
        with open(path) as f:
            k = yaml.safe_load(f) or {}
        entry = {
            "path": os.path.relpath(path, root),
            "kind": k.get("kind"),
            "namespace": k.get("namespace"),
            "resources": k.get("resources") or [],
            "missing": [],
        }
        for r in entry["resources"]:
            target = os.path.normpath(os.path.join(directory, r))
            if os.path.isdir(target):
                if not os.path.isfile(os.path.join(target, "kustomization.yaml")):
                    entry["missing"].append(r + " (a directory without kustomization.yaml)")
            elif not os.path.isfile(target):
                entry["missing"].append(r)
            elif target not in files:
                files.append(target)
        kustomizations.append(entry)

    documents = []
    for path in files:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    documents.append({"file": os.path.relpath(path, root), "doc": doc})

    unlisted = []
    for directory, _dirs, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = os.path.join(directory, name)
            if name.endswith((".yaml", ".yml")) and name != "kustomization.yaml" and path not in files:
                unlisted.append(os.path.relpath(path, root))

    json.dump(
        {
            "kustomizations": kustomizations,
            "files": [os.path.relpath(p, root) for p in files],
            "documents": documents,
            "unlisted": unlisted,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main(sys.argv[1])
