"""Check the files in cluster/ offline: no cloud, no Kubernetes, no Ray cluster is contacted.

    python cluster/validate.py

* every YAML file parses;
* ray-cluster.yaml: Ray's own cluster-launcher checks (``prepare_config`` fills the provider
  defaults, ``validate_config`` checks the JSON schema and the node types) — what ``ray up``
  runs before it talks to the cloud (``ray up`` itself has no dry run);
* runtime_env.yaml: merged as ``ray job submit --runtime-env ... --working-dir .`` merges it,
  validated by ``ray.runtime_env.RuntimeEnv``, then packaged exactly as the upload would be
  (excludes and .gitignore applied) to report its size and that no excluded folder slipped in;
  no secret-looking variable in env_vars;
* rayjob.yaml: a RayJob of apiVersion ray.io/v1 with the fields KubeRay reads, its
  runtimeEnvYAML valid, GPU limits on the worker group, no secret value inlined;
* pipeline-weibo-250.yaml: loads as a ``jobs.pipeline`` config with absolute data/output paths.

Needs the ``ray`` extra (the project's test environment has it). Exit status 1 on a problem.
"""

from __future__ import annotations

import re
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# A variable named like a credential (OPENAI_API_KEY, HF_TOKEN, ...; not TOKENIZERS_PARALLELISM).
SECRET_NAME = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|CREDENTIALS?)(_|$)", re.IGNORECASE)
problems: list[str] = []


def check(condition: bool, message: str) -> None:
    if not condition:
        problems.append(message)
        print(f"  FAIL {message}")


def load(name: str):
    with open(HERE / name, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def cluster_launcher() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("ray-cluster.yaml")
    prepared = prepare_config(config)
    validate_config(prepared)
    types = prepared["available_node_types"]
    gpu_types = [name for name in types if name != prepared["head_node_type"]]
    check(bool(gpu_types), "ray-cluster.yaml: no worker node types")
    for name in gpu_types:
        instance = types[name]["node_config"].get("InstanceType", "")
        check(instance.startswith(("g", "p")), f"ray-cluster.yaml: worker type {name} is not a GPU instance ({instance})")
    run_options = " ".join(prepared["docker"].get("run_options", []))
    check("/mnt/shared" in run_options, "ray-cluster.yaml: /mnt/shared is not mounted into the container")
    print(f"  ray-cluster.yaml: schema valid; head {prepared['head_node_type']}, workers "
          + ", ".join(f"{n} ({types[n]['node_config']['InstanceType']}, {types[n]['min_workers']}-{types[n]['max_workers']})"
                      for n in gpu_types))


def runtime_env() -> None:
    from ray._private.runtime_env.packaging import create_package
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(HERE / "runtime_env.yaml"), working_dir=str(ROOT))
    RuntimeEnv(**env)  # raises on an unknown or malformed field
    for name in env.get("env_vars", {}):
        check(not SECRET_NAME.search(name), f"runtime_env.yaml: env_vars has {name}")
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "working_dir.zip"
        create_package(str(ROOT), package, include_gitignore=True, excludes=env.get("excludes", []), logger=None)
        names = zipfile.ZipFile(package).namelist()
        size = package.stat().st_size
    tops = sorted({name.split("/")[0] for name in names})
    for unwanted in ("runs", ".venv", ".venv-vllm", ".gpu_bundle", ".git", ".whl", ".hypothesis"):
        check(unwanted not in tops, f"runtime_env.yaml: {unwanted}/ would be uploaded")
    check(any(n.startswith("knowfree_core/") for n in names) and any(n.startswith("jobs/") for n in names),
          "runtime_env.yaml: knowfree_core/ or jobs/ is not in the working_dir package")
    check(size < 64 * 2**20, f"runtime_env.yaml: the working_dir package is {size / 2**20:.1f} MiB")
    print(f"  runtime_env.yaml: valid RuntimeEnv; working_dir package {size / 2**20:.2f} MiB, "
          f"{len(names)} entries, top level: {' '.join(tops)}")


def rayjob() -> None:
    from ray.runtime_env import RuntimeEnv

    job = load("rayjob.yaml")
    check(job.get("apiVersion") == "ray.io/v1" and job.get("kind") == "RayJob", "rayjob.yaml: not a ray.io/v1 RayJob")
    spec = job["spec"]
    check("jobs.pipeline" in spec.get("entrypoint", ""), "rayjob.yaml: the entrypoint does not run jobs.pipeline")
    check(spec.get("shutdownAfterJobFinishes") is True, "rayjob.yaml: shutdownAfterJobFinishes is not true")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    # working_dir is a folder of the image (the submitter pod uploads it), not of this machine.
    working_dir = env.pop("working_dir", "")
    check(working_dir.startswith("/") or "://" in working_dir, f"rayjob.yaml: working_dir {working_dir!r}")
    RuntimeEnv(**env)
    for name in env.get("env_vars", {}):
        check(not SECRET_NAME.search(name), f"rayjob.yaml: runtimeEnvYAML env_vars has {name}")
    cluster = spec["rayClusterSpec"]
    groups = cluster["workerGroupSpecs"]
    gpus = [
        container["resources"]["limits"].get("nvidia.com/gpu")
        for group in groups for container in group["template"]["spec"]["containers"]
    ]
    check(any(gpus), "rayjob.yaml: no worker container asks for nvidia.com/gpu")
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    for pod in pods:
        for container in pod["containers"]:
            for variable in container.get("env", []):
                if SECRET_NAME.search(variable["name"]):
                    check("valueFrom" in variable and "value" not in variable,
                          f"rayjob.yaml: {variable['name']} is inlined instead of coming from a Secret")
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            check("/mnt/shared" in mounts, f"rayjob.yaml: container {container['name']} does not mount /mnt/shared")
    print(f"  rayjob.yaml: RayJob with {len(groups)} worker group(s), GPUs per worker {gpus}; "
          f"entrypoint: {spec['entrypoint'].strip()}")


def pipeline_config() -> None:
    from knowfree_jobs.pipeline import PipelineConfig  # jobs/, as the wheel installs it
    from knowfree_core.config import load_config, load_structured

    config = load_structured(PipelineConfig, HERE / "pipeline-weibo-250.yaml")
    train = load_config(ROOT / config.train_config, list(config.train_overrides))
    for key, value in (("output_dir", config.output_dir), ("data.train", train.data.train),
                       ("data.dev", train.data.dev), ("data.test", train.data.test)):
        check(str(value).startswith("/mnt/shared/"), f"pipeline-weibo-250.yaml: {key}={value} is not on /mnt/shared")
    print(f"  pipeline-weibo-250.yaml: loads; output_dir {config.output_dir}, train resources "
          f"{config.train_resources}")


def main() -> int:
    for path in sorted(HERE.glob("*.yaml")):
        try:
            load(path.name)
            print(f"  {path.name}: YAML parses")
        except yaml.YAMLError as error:
            check(False, f"{path.name}: {error}")
    for step in (cluster_launcher, runtime_env, rayjob, pipeline_config):
        try:
            step()
        except Exception as error:  # report every file, not only the first failure
            check(False, f"{step.__name__}: {type(error).__name__}: {error}")
    print("cluster/: OK" if not problems else f"cluster/: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
