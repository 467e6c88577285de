"""deploy_check.py - renders deploy/'s kustomizations and validates what comes out, offline.

Run by test_deploy_lint.sh with the test venv's Python (PyYAML and kubernetes-validate):
  deploy_check.py SOURCE_DIR KUBERNETES_VERSION [BUILD_DIR]

- Renders deploy/ and each deploy/overlays/* with a small kustomize of its own (the fields deploy/
  uses: resources, namespace, nameSuffix, labels, strategic-merge patches; any other field is an
  error, so the renderer never skips what it does not know). Where `kustomize` or `kubectl` is on
  PATH, their rendering must be the same set of objects.
- Validates every rendered object with kubernetes-validate against KUBERNETES_VERSION, strictly
  (unknown fields are errors).
- deploy/lws/*.yaml (LeaderWorkerSet, a CRD that no offline schema knows): the fields its
  controller needs are checked by hand, its pod templates are validated as core PodTemplates,
  and its worker pod must equal a StatefulSet group's but for the group's name and rank.
- Ties the manifests to the code: each flag in the ConfigMaps' FOLIO_*_FLAGS and compose's is in
  its binary's --help (BUILD_DIR), each role a container runs is one docker/entrypoint.sh knows,
  and docker/Dockerfile's build stage installs every -dev package scripts/setup.sh does.
"""
import copy
import os
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import yaml

SRC, K8S_VERSION = sys.argv[1], sys.argv[2]
BUILD = sys.argv[3] if len(sys.argv) > 3 else None
failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}")


# --- a small kustomize -----------------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "PersistentVolume"}
KNOWN_FIELDS = {"apiVersion", "kind", "resources", "namespace", "nameSuffix", "labels", "patches"}


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def merge(base, patch):
    """Strategic merge as deploy/ uses it: maps merge, lists of named maps merge by name, other
    lists are replaced, null deletes."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
        return out
    named = lambda xs: isinstance(xs, list) and xs and all(isinstance(x, dict) and "name" in x for x in xs)
    if named(base) and named(patch):
        out = [copy.deepcopy(x) for x in base]
        for p in patch:
            for i, x in enumerate(out):
                if x["name"] == p["name"]:
                    out[i] = merge(x, p)
                    break
            else:
                out.append(copy.deepcopy(p))
        return out
    return copy.deepcopy(patch)


def selects(obj, target):
    if "kind" in target and obj["kind"] != target["kind"]:
        return False
    if "name" in target and obj["metadata"]["name"] != target["name"]:
        return False
    for term in filter(None, target.get("labelSelector", "").split(",")):
        k, v = term.split("=")
        if obj["metadata"].get("labels", {}).get(k) != v:
            return False
    return True


def add_labels(obj, pairs, selectors, templates):
    obj["metadata"].setdefault("labels", {}).update(pairs)
    spec = obj.get("spec", {})
    if selectors:
        if obj["kind"] == "Service":
            spec.setdefault("selector", {}).update(pairs)
        elif "selector" in spec:
            spec["selector"].setdefault("matchLabels", {}).update(pairs)
    if (selectors or templates) and "template" in spec:
        spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def render(kdir):
    with open(os.path.join(kdir, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    unknown = set(k) - KNOWN_FIELDS
    if unknown:
        raise SystemExit(f"{kdir}/kustomization.yaml: fields this renderer does not know: {sorted(unknown)}")
    objs = []
    for r in k.get("resources", []):
        p = os.path.join(kdir, r)
        objs += render(p) if os.path.isdir(p) else load_docs(p)
    if "nameSuffix" in k:
        renamed = {}
        for o in objs:
            if o["kind"] != "Namespace":
                old = o["metadata"]["name"]
                o["metadata"]["name"] = old + k["nameSuffix"]
                renamed[(o["kind"], old)] = o["metadata"]["name"]
        for o in objs:  # the one reference deploy/ has inside a suffixed scope
            if o["kind"] == "StatefulSet" and ("Service", o["spec"]["serviceName"]) in renamed:
                o["spec"]["serviceName"] = renamed[("Service", o["spec"]["serviceName"])]
    for lab in k.get("labels", []):
        for o in objs:
            add_labels(o, lab["pairs"], lab.get("includeSelectors", False), lab.get("includeTemplates", False))
    for p in k.get("patches", []):
        patch = yaml.safe_load(p["patch"]) if "patch" in p else load_docs(os.path.join(kdir, p["path"]))[0]
        target = p.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
        hit = False
        for i, o in enumerate(objs):
            if selects(o, target):
                keep = o["metadata"]["name"]
                objs[i] = merge(o, patch)
                objs[i]["metadata"]["name"] = keep
                hit = True
        if not hit:
            raise SystemExit(f"{kdir}: patch {p} matches nothing")
    if "namespace" in k:
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    return objs


def key(o):
    return (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])


def by_key(objs):
    return {key(o): o for o in objs}


def external_render(kdir):
    """kustomize's own rendering, where a kustomize is installed; None where not."""
    for cmd in (["kustomize", "build"], ["kubectl", "kustomize"]):
        if shutil.which(cmd[0]):
            r = subprocess.run(cmd + [kdir], capture_output=True, text=True, timeout=120)
            if r.returncode:
                fail(f"{' '.join(cmd)} {kdir}: {r.stderr.strip()}")
                return None, cmd
            return [d for d in yaml.safe_load_all(r.stdout) if d], cmd
    return None, None


# --- validation --------------------------------------------------------------------------------

def validate(obj, where):
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        return True
    except kubernetes_validate.ValidationError as e:
        fail(f"{where}: {key(obj)}: {e.message} at {'.'.join(str(p) for p in e.path)}")
    except Exception as e:  # no schema for the kind, an invalid schema
        fail(f"{where}: {key(obj)}: {e}")
    return False


def pod_specs(obj):
    spec = obj.get("spec", {})
    if "template" in spec:
        yield spec["template"]["spec"]
    lwt = spec.get("leaderWorkerTemplate", {})
    for t in ("leaderTemplate", "workerTemplate"):
        if t in lwt:
            yield lwt[t]["spec"]


def roles_of_entrypoint():
    with open(os.path.join(SRC, "docker", "entrypoint.sh")) as f:
        text = f.read()
    return set(re.findall(r"^  ([a-z-]+)\)$", text, re.M))


def helps():
    """Each binary's --help, for the flags the manifests pass (None where it is not built)."""
    out = {}
    for role, binary in (("COORDINATOR", "folio-coordinator"), ("WORKER", "folio-worker"),
                         ("GATEWAY", "folio-gateway"), ("UP", "folioctl")):
        path = os.path.join(BUILD, binary) if BUILD else None
        if path and os.access(path, os.X_OK):
            args = [path, "up", "--help"] if binary == "folioctl" else [path, "--help"]
            r = subprocess.run(args, capture_output=True, text=True, timeout=30)
            out[role] = r.stdout + r.stderr
        else:
            out[role] = None
    return out


HELP = helps()


def check_flags(env, where):
    """Every --flag in FOLIO_<ROLE>_FLAGS is one the role's binary lists in its --help."""
    for name, value in env.items():
        m = re.fullmatch(r"FOLIO_([A-Z]+)_FLAGS", name)
        if not m or not value:
            continue
        role = m.group(1)
        text = HELP.get(role)
        if text is None:
            print(f"note {where}: {name}: the binary is not built here, its flags are not checked")
            continue
        flags = re.findall(r"(?<!\S)(--?[a-z][a-z0-9-]*)", str(value))
        bad = [f for f in flags if not re.search(r"(?<![\w-])" + re.escape(f) + r"(?![\w-])", text)]
        for flag in bad:
            fail(f"{where}: {name}: {flag} is not a flag of the {role.lower()} (--help)")
        if not bad:
            print(f"ok   {where}: {name}: {len(flags)} flags, each in the {role.lower()}'s --help")


def check_containers(obj, where):
    roles = roles_of_entrypoint()
    for spec in pod_specs(obj):
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            args = c.get("args") or []
            if args and args[0] not in roles:
                fail(f"{where}: {key(obj)} container {c['name']}: role {args[0]!r} is not in docker/entrypoint.sh")
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                cmd = c.get(probe, {}).get("exec", {}).get("command", [])
                if cmd[:1] == ["folio-entrypoint"] and cmd[1] not in roles:
                    fail(f"{where}: {key(obj)} {probe}: folio-entrypoint {cmd[1]} is unknown")
            pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            if pre[:1] == ["folio-entrypoint"] and pre[1] not in roles:
                fail(f"{where}: {key(obj)} preStop: folio-entrypoint {pre[1]} is unknown")


# --- the checks --------------------------------------------------------------------------------

deploy = os.path.join(SRC, "deploy")
overlays = os.path.join(deploy, "overlays")
targets = [deploy] + sorted(os.path.join(overlays, d) for d in os.listdir(overlays))
statefulset_pod = None
for kdir in targets:
    name = os.path.relpath(kdir, SRC)
    objs = render(kdir)
    mine = by_key(objs)
    if len(mine) != len(objs):
        fail(f"{name}: two objects with the same kind, namespace and name")
    theirs, cmd = external_render(kdir)
    if theirs is not None:
        if by_key(theirs) != mine:
            other = by_key(theirs)
            diff = [k for k in set(mine) | set(other) if mine.get(k) != other.get(k)]
            fail(f"{name}: {' '.join(cmd)} renders differently from this renderer: {sorted(diff)}")
        else:
            print(f"ok   {name}: {' '.join(cmd)} renders the same {len(objs)} objects")
    else:
        print(f"note {name}: no kustomize or kubectl here; rendered by deploy_check.py alone")
    good = sum(validate(o, name) for o in objs)
    print(f"ok   {name}: {good} of {len(objs)} objects valid for Kubernetes {K8S_VERSION}")
    for o in objs:
        check_containers(o, name)
        if o["kind"] == "ConfigMap":
            check_flags(o.get("data", {}), f"{name} ConfigMap {o['metadata']['name']}")
        if kdir == deploy and o["kind"] == "StatefulSet" and statefulset_pod is None:
            statefulset_pod = o["spec"]["template"]["spec"]
    kinds = sorted({o["kind"] for o in objs})
    for want in ("Deployment", "Service", "StatefulSet", "ConfigMap", "PodDisruptionBudget"):
        if want not in kinds:
            fail(f"{name}: no {want}")

# LeaderWorkerSet: no schema offline; its shape by hand, its pods as core PodTemplates.
for fn in sorted(os.listdir(os.path.join(deploy, "lws"))):
    path = os.path.join(deploy, "lws", fn)
    for o in load_docs(path):
        where = os.path.relpath(path, SRC)
        if (o.get("apiVersion"), o.get("kind")) != ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"):
            validate(o, where)
            continue
        spec = o.get("spec", {})
        lwt = spec.get("leaderWorkerTemplate", {})
        if not isinstance(spec.get("replicas", 1), int) or not isinstance(lwt.get("size"), int) or lwt["size"] < 1:
            fail(f"{where}: spec.replicas and leaderWorkerTemplate.size must be integers, size >= 1")
        if "workerTemplate" not in lwt:
            fail(f"{where}: leaderWorkerTemplate.workerTemplate is required")
        if lwt.get("restartPolicy", "None") not in ("None", "RecreateGroupOnPodRestart", "Default"):
            fail(f"{where}: leaderWorkerTemplate.restartPolicy {lwt['restartPolicy']!r}")
        for t in ("leaderTemplate", "workerTemplate"):
            if t in lwt:
                pt = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{o['metadata']['name']}-{t}"},
                      "template": lwt[t]}
                if validate(pt, f"{where} {t}"):
                    print(f"ok   {where}: {t} valid as a PodTemplate for Kubernetes {K8S_VERSION}")
        check_containers(o, where)
        # The same worker pod as a StatefulSet group's, but for how the group and rank are found.
        if statefulset_pod is not None and "workerTemplate" in lwt:
            a, b = copy.deepcopy(statefulset_pod), copy.deepcopy(lwt["workerTemplate"]["spec"])
            for s in (a, b):
                for c in s["containers"]:
                    c.pop("env", None)
            if a != b:
                fail(f"{where}: the worker pod differs from deploy/base/worker/statefulset.yaml's beyond its env")
            else:
                print(f"ok   {where}: worker pod as the StatefulSet group's")

# docker/compose.yaml: roles and flags.
with open(os.path.join(SRC, "docker", "compose.yaml")) as f:
    compose = yaml.safe_load(f)
roles = roles_of_entrypoint()
for svc, s in compose["services"].items():
    cmd = s.get("command") or ["up"]
    if cmd[0] not in roles:
        fail(f"docker/compose.yaml {svc}: role {cmd[0]!r} is not in docker/entrypoint.sh")
    check_flags(s.get("environment") or {}, f"docker/compose.yaml {svc}")

# The Dockerfile builds with what scripts/setup.sh installs (its -dev packages and compilers).
with open(os.path.join(SRC, "scripts", "setup.sh")) as f:
    setup = f.read()
setup_pkgs = set(re.search(r"packages=\(([^)]*)\)", setup, re.S).group(1).split())
with open(os.path.join(SRC, "docker", "Dockerfile")) as f:
    dockerfile = f.read()
build_stage = dockerfile.split(" AS runtime")[0]
for p in sorted(setup_pkgs):
    if (p.endswith("-dev") and not p.startswith("libclang")) or p in ("build-essential", "cmake", "pkg-config",
                                                                     "protobuf-c-compiler"):
        if not re.search(r"(?<![\w-])" + re.escape(p) + r"(?![\w-])", build_stage):
            fail(f"docker/Dockerfile: the build stage lacks {p}, which scripts/setup.sh installs")

if failures:
    print(f"deploy_check: {len(failures)} failure(s)")
    sys.exit(1)
print("deploy_check: all checks passed")
