"""The cluster kit (docker/): the recipes parse, follow their schemas, and name only scripts and configs that exist.

No Docker engine or cluster is needed: the Dockerfile, the `ray up` cluster YAML, the KubeRay RayJob and the README are
read as text, so a renamed script, a missing config or an unpinned image fails here instead of on a cluster.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
CLUSTER_YAML = DOCKER / "ray-cluster.yaml"
RAYJOB_YAML = DOCKER / "rayjob.yaml"
README = DOCKER / "README.md"
RECIPES = [DOCKERFILE, CLUSTER_YAML, RAYJOB_YAML, README]

# What the recipes must cover (issue 6): pretraining, fine-tuning and the sweep, each with its cluster config.
REQUIRED_REFERENCES = {
    "launch/pretrain.py",
    "launch/finetune.py",
    "launch/sweep.py",
    "configs/pretrain_btcv.yaml",
    "configs/finetune_btcv.yaml",
    "configs/sweep_btcv.yaml",
}

# Repo-relative paths of scripts, configs and recipe files; not part of an absolute path or a URL.
_REPO_PATH = re.compile(r"(?<![\w/.:-])((?:launch|tools|bench|configs|docker)/[\w./-]*?\.(?:py|ya?ml|txt|md))\b")
_ENTRY = re.compile(r"\b(?:python3?|deepspeed|torchrun)\s+(?:-{1,2}[\w-]+(?:[ =]\S+)?\s+)*?([\w./-]+\.py)\b")
_CONFIG = re.compile(r"--config[ =]([\w./-]+)")


def _yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current:
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
        current = ""
    return out


def _base_image() -> str:
    instructions = _dockerfile_instructions()
    args: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip("\"'")
        if word == "FROM":
            image = [t for t in rest.split() if not t.startswith("--")][0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
    raise AssertionError("docker/Dockerfile has no FROM")


def _assert_pinned(image: str, where: str) -> None:
    assert "$" not in image, f"{where}: image {image!r} has an unresolved variable"
    if "@sha256:" in image:
        return
    name, sep, tag = image.rpartition(":")
    assert sep and "/" not in tag and tag, f"{where}: image {image!r} has no tag; pin one"
    assert tag != "latest", f"{where}: image {image!r} uses :latest; pin a version"


def _images(obj) -> list[str]:
    """Every value of an `image` key in a parsed YAML tree."""
    if isinstance(obj, dict):
        found = [v for k, v in obj.items() if k == "image" and isinstance(v, str)]
        return found + [i for v in obj.values() for i in _images(v)]
    if isinstance(obj, list):
        return [i for v in obj for i in _images(v)]
    return []


def _pins() -> dict[str, str]:
    lines = [ln.split("#")[0].strip() for ln in (DOCKER / "constraints.txt").read_text().splitlines()]
    return dict(ln.split("==", 1) for ln in lines if ln)


def _rayjob() -> dict:
    jobs = [d for d in _yaml_docs(RAYJOB_YAML) if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, "docker/rayjob.yaml must hold exactly one RayJob"
    return jobs[0]


def _references() -> dict[str, set[str]]:
    """Repo-relative path -> the recipe files that name it."""
    refs: dict[str, set[str]] = {}
    for recipe in RECIPES:
        text = recipe.read_text()
        found = set(_REPO_PATH.findall(text)) | set(_ENTRY.findall(text)) | set(_CONFIG.findall(text))
        for path in found:
            refs.setdefault(path, set()).add(recipe.name)
    return refs


# ---- YAML ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DOCKER.glob("*.y*ml")), ids=lambda p: p.name)
def test_yaml_files_parse(path: Path) -> None:
    docs = _yaml_docs(path)
    assert docs, f"{path.name} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{path.name}: every document must be a mapping"


def test_recipes_are_present() -> None:
    for path in [*RECIPES, DOCKER / "constraints.txt", REPO / ".dockerignore"]:
        assert path.is_file(), f"missing {path.relative_to(REPO)}"


# ---- references to the code ------------------------------------------------------------------------------------------


def test_referenced_scripts_and_configs_exist() -> None:
    refs = _references()
    missing = {p: sorted(files) for p, files in refs.items() if not (REPO / p).is_file()}
    assert not missing, "recipes name files that are not in the repo: " + ", ".join(
        f"{p} (in {', '.join(f)})" for p, f in sorted(missing.items())
    )


def test_recipes_cover_pretrain_finetune_and_sweep() -> None:
    absent = REQUIRED_REFERENCES - set(_references())
    assert not absent, f"the cluster recipes no longer mention {sorted(absent)}"


def test_entry_points_use_repo_relative_paths() -> None:
    """`python <script>.py` and `--config <file>` in the recipes point into the repo (the job's working dir)."""
    for recipe in RECIPES:
        text = recipe.read_text()
        for script in _ENTRY.findall(text):
            assert re.fullmatch(r"(launch|tools|bench)/[\w.-]+\.py", script), f"{recipe.name}: entry point {script}"
        for config in _CONFIG.findall(text):
            assert re.fullmatch(r"configs/[\w.-]+\.ya?ml", config), f"{recipe.name}: --config {config}"


# ---- Dockerfile ------------------------------------------------------------------------------------------------------


def test_dockerfile_base_image_is_pinned() -> None:
    _assert_pinned(_base_image(), "docker/Dockerfile FROM")


def test_dockerfile_copy_sources_exist_and_are_not_ignored() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copies = [rest for word, rest in _dockerfile_instructions() if word in ("COPY", "ADD")]
    assert copies, "docker/Dockerfile copies nothing"
    for rest in copies:
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        assert not any(p.startswith("--from") for p in shlex.split(rest)), "multi-stage COPY: extend this test"
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"docker/Dockerfile: COPY source {src} does not exist (context: repo root)"
            assert src.split("/")[0] not in ignored, f"docker/Dockerfile: COPY source {src} is in .dockerignore"


def test_dockerfile_runs_as_non_root_user() -> None:
    instructions = _dockerfile_instructions()
    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "docker/Dockerfile has no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"docker/Dockerfile ends as USER {users[-1]}"
    assert any(word == "WORKDIR" for word, _ in instructions)


def test_dockerfile_ships_the_tested_torch_and_sets_the_environment() -> None:
    instructions = _dockerfile_instructions()
    runs = [rest for word, rest in instructions if word == "RUN"]
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    tested = (REPO / "requirements/constraints-cpu.txt").read_text().split("torch==")[1].split()[0]
    assert args["TORCH_VERSION"] == tested, "the image's torch must be the version the test suite runs with"
    assert any("^(torch|" in r or "^torch==" in r for r in runs), "the build must pin the torch it installed"
    for r in runs:
        for install in re.findall(r"pip install[^&;|]*", r):
            if '"torch==${TORCH_VERSION}"' in install:
                continue  # the one install of torch itself
            assert "--no-deps" in install or "-c /etc/medmae/torch.txt" in install, (
                f"docker/Dockerfile: `{install.strip()}` could replace the image's CUDA torch"
            )
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    assert "RAY_USAGE_STATS_ENABLED=0" in env
    assert "TORCH_EXTENSIONS_DIR=" in env


def test_dockerignore_keeps_bulk_out_of_the_context() -> None:
    entries = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "data"} <= entries


def test_image_constraints_are_exact_pins() -> None:
    pins = _pins()
    assert all(re.fullmatch(r"[\w.-]+==[\w.+-]+", f"{k}=={v}") for k, v in pins.items())
    assert "torch" not in {k.lower() for k in pins}, "torch is installed on its own (TORCH_VERSION)"
    assert "ray" in pins and "deepspeed" in pins


# ---- ray up ----------------------------------------------------------------------------------------------------------


def test_ray_cluster_yaml_structure() -> None:
    cfg = _yaml_docs(CLUSTER_YAML)[0]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers, "no worker node types"
    assert any(v["resources"].get("GPU", 0) > 0 for v in workers.values()), "no GPU worker type"
    for name, node in workers.items():
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"], f"{name}: min_workers > max_workers"
    assert sum(v.get("min_workers", 0) for v in workers.values()) <= cfg["max_workers"]
    _assert_pinned(cfg["docker"]["image"], "docker/ray-cluster.yaml docker.image")
    assert any("/mnt/shared" in opt for opt in cfg["docker"].get("run_options", [])), "no shared storage mount"


def test_ray_cluster_yaml_matches_rays_schema() -> None:
    # Both pinned with ray[default] (docker/constraints.txt): nothing here may skip, or a broken recipe passes.
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config  # what `ray up` runs first

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    cfg = _yaml_docs(CLUSTER_YAML)[0]
    jsonschema.validate(cfg, json.loads(schema_path.read_text()))
    validate_config(prepare_config(cfg))


# ---- KubeRay ---------------------------------------------------------------------------------------------------------


def test_rayjob_has_the_required_fields() -> None:
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert not re.search(r"&&|;|\|", spec["entrypoint"]), "KubeRay pastes the entrypoint into a shell command"
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = cluster["workerGroupSpecs"]
    assert groups, "no workerGroupSpecs"
    for g in groups:
        assert g["groupName"]
        assert g.get("minReplicas", 0) <= g["replicas"] <= g.get("maxReplicas", g["replicas"])
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) > 0, f"worker group {g['groupName']} asks for no GPU"


def test_rayjob_matches_the_image_and_its_pins() -> None:
    job = _rayjob()
    for image in _images(job):
        _assert_pinned(image, "docker/rayjob.yaml")
    cluster_image = _yaml_docs(CLUSTER_YAML)[0]["docker"]["image"]
    assert set(_images(job)) == {cluster_image}, "docker/rayjob.yaml and docker/ray-cluster.yaml use different images"
    pins = _pins()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pins["ray"], "rayVersion differs from the image's ray"
    # the working dir the entrypoint runs in is the code baked into the image
    working_dir = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]
    workdirs = [rest for word, rest in _dockerfile_instructions() if word == "WORKDIR"]
    assert working_dir == workdirs[-1]


def test_rayjob_volumes_resolve() -> None:
    docs = _yaml_docs(RAYJOB_YAML)
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = pod["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"volumeMount {mount['name']} has no volume"
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"PVC {v} is not defined in the file"
