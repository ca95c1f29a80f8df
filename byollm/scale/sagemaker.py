"""`byollm cloud sagemaker CONFIG`: one of our recipe configs as an Amazon SageMaker training job.

What the job is (the CreateTrainingJob request this module builds; `--dry-run` prints it and calls nothing):

- the PyTorch Deep Learning Container (or `--image-uri`) on `--instance-count` instances of `--instance-type`;
- our code as a script-mode source bundle: `sagemaker_entry.py`, the `byollm` package, the config and a
  requirements.txt with byollm's dependencies except torch (the image's CUDA torch stays), uploaded next to the
  job's output in S3;
- on every instance the entry (`byollm/scale/sagemaker_entry.py`) starts `torchrun --nnodes N --nproc_per_node G
  --node_rank R --master_addr algo-1 ... -m byollm.cli RECIPE --config CONFIG --out_dir /opt/ml/checkpoints --name
  NAME --resume true`: the SDK's `distribution={"torch_distributed": {"enabled": True}}` (torchrun on every node),
  written out by us so it is the same command as our SLURM template, and is tested;
- `--data s3://...`: an S3 channel "data" that SageMaker puts at /opt/ml/input/data/data, which becomes the run's
  BYOLLM_DATA_MIRROR (where byollm looks first for a dataset, e.g. fineweb-edu/*.parquet);
- checkpoints: /opt/ml/checkpoints <-> `--checkpoint-s3`, synced by SageMaker while the job runs and restored onto
  a restarted instance; with the fixed run name and `--resume true` a spot job that was interrupted continues from
  its newest complete checkpoint (a new job given the same `--checkpoint-s3` continues it too);
- `--spot`: managed spot training, MaxWaitTimeInSeconds (`--max-wait`, default twice `--max-run`) >= MaxRuntime.

Why boto3 and not the SageMaker Python SDK: `pip install sagemaker` gives SDK v3 (3.27 when this was written),
whose training part (sagemaker-train) pulls about 90 packages, mlflow, scikit-learn, scipy, pyarrow, SQLAlchemy,
Flask and databricks-sdk among them; v2 (2.257) is the legacy line and downgrades `packaging`. Both build the
same CreateTrainingJob request in the end, and both need AWS calls before they can even show it (default bucket,
role). The request is a stable, documented API: building it here makes the dry run exact, lets botocore check it
against the service model offline (tests/test_sagemaker.py), and the `cloud` extra is boto3 alone. The one thing
taken from the SDK is data: the PyTorch training image names (its image_uri_config/pytorch.json, v2.257.7).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional  # noqa: UP035 - jsonargparse reads the types at run time

from byollm.errors import ByollmError, ConfigError, require
from byollm.scale.sagemaker_entry import CHECKPOINT_DIR, DATA_CHANNEL, torchrun_command

RECIPES = ("pretrain", "sft", "reward", "dpo", "orpo", "finetune", "ppo")
# byollm extras the job installs besides the core dependencies, per recipe (datasets: streamed and Hub data).
RECIPE_EXTRAS: dict[str, tuple[str, ...]] = {"finetune": ("data", "finetune")}
DEFAULT_EXTRAS = ("data",)
ENTRY_POINT = "sagemaker_entry.py"
MAX_RUNTIME_LIMIT = 28 * 24 * 3600  # SageMaker's longest training job: 28 days
ROLE_ENV = "SAGEMAKER_ROLE"
PLACEHOLDER_ROLE = "arn:aws:iam::111122223333:role/YOUR-SAGEMAKER-EXECUTION-ROLE"
ROLE_PATTERN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/\S+")
JOB_NAME_PATTERN = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")  # CreateTrainingJob's TrainingJobName

# PyTorch training images (AWS Deep Learning Containers): version -> Python, and the ECR account per region where it
# is not the usual one; from the SageMaker Python SDK v2.257.7, sagemaker/image_uri_config/pytorch.json.
DLC_PY_VERSIONS = {"2.5.1": "py311", "2.6.0": "py312", "2.7.1": "py312", "2.8.0": "py312"}
DLC_ACCOUNT = "763104351884"
DLC_OTHER_ACCOUNTS = {
    "af-south-1": "626614931356", "ap-east-1": "871362719292", "ap-east-2": "975050140332",
    "ap-northeast-3": "364406365360", "ap-south-2": "772153158452", "ap-southeast-3": "907027046896",
    "ap-southeast-4": "457447274322", "ap-southeast-5": "550225433462", "ap-southeast-6": "633930458069",
    "ap-southeast-7": "590183813437", "ca-west-1": "204538143572", "cn-north-1": "727897471807",
    "cn-northwest-1": "727897471807", "eu-central-2": "380420809688", "eu-south-1": "692866216735",
    "eu-south-2": "503227376785", "il-central-1": "780543022126", "me-central-1": "914824155844",
    "me-south-1": "217643126080", "mx-central-1": "637423239942", "us-gov-east-1": "446045086412",
    "us-gov-west-1": "442386744353"}

# SageMaker AI training, on-demand, us-east-1, USD per instance-hour; accelerators per instance.
PRICES_TAKEN = ("list prices of aws.amazon.com/sagemaker/pricing as of 2024, not re-checked when this was written "
                "(no network); prices change (AWS cut EC2 P4/P5 on-demand prices by up to 45% in June 2025), so "
                "check the page or pass --price-per-hour")
INSTANCES: dict[str, tuple[float, int, str]] = {
    "ml.g5.xlarge": (1.41, 1, "1x A10G 24GB"),
    "ml.g5.12xlarge": (7.09, 4, "4x A10G 24GB"),
    "ml.g5.48xlarge": (20.36, 8, "8x A10G 24GB"),
    "ml.p4d.24xlarge": (37.69, 8, "8x A100 40GB"),
    "ml.p4de.24xlarge": (47.11, 8, "8x A100 80GB"),
    "ml.p5.48xlarge": (113.07, 8, "8x H100 80GB"),
    "ml.trn1.32xlarge": (24.72, 0, "16x Trainium (Neuron SDK)"),
}
ASSUMED_SPOT_DISCOUNT = 0.70  # an assumption: SageMaker says managed spot saves "up to 90%"; it varies


@dataclasses.dataclass
class SageMakerSpec:
    """What `byollm cloud sagemaker` was asked for (the CLI's options, one to one)."""

    config: str
    recipe: str = "pretrain"
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = 1
    spot: bool = False
    max_run: int = 86400
    max_wait: int | None = None
    data: str | None = None
    input_mode: str = "File"
    channels: list[str] = dataclasses.field(default_factory=list)
    checkpoint_s3: str | None = None
    output_s3: str | None = None
    role: str | None = None
    image_uri: str | None = None
    framework_version: str = "2.8.0"
    py_version: str | None = None
    job_name: str | None = None
    region: str | None = None
    volume_size: int = 100
    overrides: list[str] = dataclasses.field(default_factory=list)
    price_per_hour: float | None = None
    spot_discount: float = ASSUMED_SPOT_DISCOUNT


@dataclasses.dataclass
class SageMakerJob:
    """A planned job: the CreateTrainingJob request, and where its parts go."""

    spec: SageMakerSpec
    request: dict[str, Any]
    run_name: str
    region: str
    code_uri: str  # s3://.../sourcedir.tar.gz
    config_path: str  # the config inside the bundle (relative to /opt/ml/code)
    hyperparameters: dict[str, Any]  # before JSON encoding: what the entry reads from SM_HPS
    notes: list[str]  # placeholders the dry run filled in


# --------------------------------------------------------------------------------------------------
# Planning: the request, without any AWS call
# --------------------------------------------------------------------------------------------------


def recipe_config_class(recipe: str) -> type:
    """The config dataclass of a recipe verb (what `byollm RECIPE --config` parses)."""
    if recipe == "pretrain":
        from byollm.train.config import TrainConfig

        return TrainConfig
    if recipe in ("sft", "reward", "dpo", "orpo"):
        from byollm.train.align import CONFIGS

        return CONFIGS[recipe]
    if recipe == "finetune":
        from byollm.finetune.recipe import FinetuneTrainConfig

        return FinetuneTrainConfig
    if recipe == "ppo":
        from byollm.train.ppo import PPOConfig

        return PPOConfig
    raise ConfigError(f"--recipe {recipe}: not a training recipe; use one of {', '.join(RECIPES)}")


def _overrides(pairs: list[str]) -> list[tuple[str, str, Any]]:
    """`--set KEY=VALUE` as (key, the text as given, the value YAML reads in it)."""
    import yaml

    out = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: write KEY=VALUE, e.g. --set grad_accum=2 or --set model.dropout=0.1")
        if key in ("out_dir", "resume"):
            raise ConfigError(f"--set {key}: the launcher sets it (out_dir {CHECKPOINT_DIR}, synced to "
                              "--checkpoint-s3; resume true, so a restarted spot job continues); leave it out")
        try:
            value = yaml.safe_load(text) if text else text
        except yaml.YAMLError:
            value = text
        out.append((key, text, value))
    return out


def _s3(uri: str, flag: str) -> tuple[str, str]:
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", uri or "")
    if not m:
        raise ConfigError(f"{flag} {uri!r}: not an S3 URI; write s3://BUCKET/PREFIX")
    return m.group(1), (m.group(2) or "").strip("/")


def _instance_type(name: str) -> None:
    try:  # the service model lists every training instance type: a typo fails here, not after provisioning
        import botocore.session

        shape = botocore.session.get_session().get_service_model("sagemaker").shape_for("TrainingInstanceType")
        valid = list(shape.enum)
    except ImportError:  # pragma: no cover - without the cloud extra only the shape is checked
        valid = []
    if (valid and name not in valid) or not re.fullmatch(r"ml\.[a-z0-9-]+\.[a-z0-9]+", name):
        close = difflib.get_close_matches(name, valid or list(INSTANCES), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"--instance-type {name}: not a SageMaker training instance type{hint}")


def image_uri(framework_version: str, py_version: str | None, region: str, instance_type: str) -> str:
    """The PyTorch training image (AWS Deep Learning Container) for a version, region and instance type."""
    if framework_version not in DLC_PY_VERSIONS:
        raise ConfigError(f"--framework-version {framework_version}: no PyTorch training image known here; use one "
                          f"of {', '.join(DLC_PY_VERSIONS)} or pass --image-uri")
    family = instance_type.split(".")[1]
    if family.startswith(("trn", "inf")):
        raise ConfigError(f"--instance-type {instance_type}: Trainium/Inferentia need a Neuron image and "
                          "torch-neuronx, which byollm's trainer does not use (CUDA or CPU); pass --image-uri if you "
                          "have one")
    processor = "gpu" if family.startswith(("g", "p")) else "cpu"
    account = DLC_OTHER_ACCOUNTS.get(region, DLC_ACCOUNT)
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    py = py_version or DLC_PY_VERSIONS[framework_version]
    return f"{account}.dkr.ecr.{region}.{domain}/pytorch-training:{framework_version}-{processor}-{py}"


def _region(spec: SageMakerSpec, environ: Mapping[str, str], dry_run: bool, notes: list[str]) -> str:
    region = spec.region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region is None and not dry_run:
        boto3 = require("boto3", "cloud")
        region = boto3.session.Session().region_name  # ~/.aws/config
    if region is None:
        if not dry_run:
            raise ConfigError("no AWS region: pass --region (e.g. us-east-1) or set AWS_REGION")
        notes.append("no --region (nor AWS_REGION): shown for us-east-1")
        region = "us-east-1"
    return region


def plan_job(spec: SageMakerSpec, *, dry_run: bool = False, environ: Mapping[str, str] | None = None,
             now: float | None = None) -> SageMakerJob:
    """Check the spec (the config is parsed here, so a typo fails before any instance starts) and build the
    CreateTrainingJob request. No AWS call; a dry run fills a missing role or region with a placeholder."""
    from byollm.config import parse_config

    environ = os.environ if environ is None else environ
    notes: list[str] = []
    if spec.recipe not in RECIPES:
        raise ConfigError(f"--recipe {spec.recipe}: not a training recipe; use one of {', '.join(RECIPES)}")
    overrides = _overrides(spec.overrides)
    cfg = parse_config(recipe_config_class(spec.recipe), spec.config, {k: v for k, _, v in overrides})
    run_name = cfg.name or re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(spec.config).stem)
    passed = [x for k, text, _ in overrides if k != "name" for x in (f"--{k}", text)]  # the run adds --name

    _instance_type(spec.instance_type)
    if spec.instance_count < 1:
        raise ConfigError(f"--instance-count {spec.instance_count}: give 1 or more instances")
    if not 1 <= spec.max_run <= MAX_RUNTIME_LIMIT:
        raise ConfigError(f"--max-run {spec.max_run}: SageMaker allows 1 to {MAX_RUNTIME_LIMIT} seconds (28 days)")
    max_wait = spec.max_wait
    if max_wait is not None and not spec.spot:
        raise ConfigError("--max-wait is the spot time limit (training plus waiting for capacity); add --spot")
    if spec.spot:
        max_wait = max_wait or min(2 * spec.max_run, MAX_RUNTIME_LIMIT)
        if max_wait < spec.max_run:
            raise ConfigError(f"--max-wait {max_wait} is shorter than --max-run {spec.max_run}; SageMaker needs "
                              "max wait >= max run (it counts the training time too)")
    if spec.input_mode not in ("File", "FastFile"):
        raise ConfigError(f"--input-mode {spec.input_mode}: use File (copied before training) or FastFile (streamed)")
    if not 0 <= spec.spot_discount < 1:
        raise ConfigError(f"--spot-discount {spec.spot_discount}: a fraction, e.g. 0.7 for 70% off")

    if spec.checkpoint_s3 is None and spec.output_s3 is None:
        raise ConfigError("no S3 location: pass --checkpoint-s3 s3://BUCKET/PREFIX (the checkpoints sync there and a "
                          "restarted job resumes from them)")
    if spec.checkpoint_s3 is not None:
        ckpt_bucket, _ = _s3(spec.checkpoint_s3, "--checkpoint-s3")
    output = (spec.output_s3 or f"s3://{ckpt_bucket}/byollm-jobs").rstrip("/")
    out_bucket, out_prefix = _s3(output, "--output-s3")
    checkpoint = (spec.checkpoint_s3 or f"{output}/checkpoints").rstrip("/")

    region = _region(spec, environ, dry_run, notes)
    role = spec.role or environ.get(ROLE_ENV)
    if role is None:
        if not dry_run:
            raise ConfigError(f"no IAM role: pass --role arn:aws:iam::ACCOUNT:role/NAME (a SageMaker execution role "
                              f"that can read and write your S3 buckets) or set {ROLE_ENV}")
        notes.append(f"no --role (nor {ROLE_ENV}): a placeholder role is shown")
        role = PLACEHOLDER_ROLE
    elif not ROLE_PATTERN.fullmatch(role):
        raise ConfigError(f"--role {role}: not an IAM role ARN; write arn:aws:iam::123456789012:role/NAME")

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    job_name = spec.job_name or re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9-]", "-", f"byollm-{run_name}"))[:47]
    job_name = job_name if spec.job_name else f"{job_name.strip('-')}-{stamp}"
    if not JOB_NAME_PATTERN.fullmatch(job_name):
        raise ConfigError(f"--job-name {job_name}: up to 63 letters, digits and hyphens, starting with a letter or "
                          "digit (and unique in your account)")
    image = spec.image_uri or image_uri(spec.framework_version, spec.py_version, region, spec.instance_type)
    code_uri = f"s3://{out_bucket}/{'/'.join(filter(None, [out_prefix, job_name, 'source', 'sourcedir.tar.gz']))}"
    config_path = f"configs/{Path(spec.config).name}"
    hps: dict[str, Any] = {"recipe": spec.recipe, "config": config_path, "name": run_name, "overrides": passed}

    channels = []
    for name, uri in [*([(DATA_CHANNEL, spec.data)] if spec.data else []), *map(_channel, spec.channels)]:
        _s3(uri, f"--data {name}" if name == DATA_CHANNEL else f"--channel {name}")
        channels.append({"ChannelName": name, "InputMode": spec.input_mode, "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}})
    if len({c["ChannelName"] for c in channels}) < len(channels):
        raise ConfigError("two S3 channels with the same name; give each --channel its own NAME")

    script_mode = {"sagemaker_program": ENTRY_POINT, "sagemaker_submit_directory": code_uri,
                   "sagemaker_container_log_level": 20, "sagemaker_job_name": job_name, "sagemaker_region": region}
    request: dict[str, Any] = {
        "TrainingJobName": job_name,
        "RoleArn": role,
        "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": spec.input_mode},
        # JSON-encoded like the SDK does; the training toolkit decodes them into SM_HPS
        "HyperParameters": {k: json.dumps(v) for k, v in {**hps, **script_mode}.items()},
        "OutputDataConfig": {"S3OutputPath": output},
        "ResourceConfig": {"InstanceType": spec.instance_type, "InstanceCount": spec.instance_count,
                           "VolumeSizeInGB": spec.volume_size},
        "StoppingCondition": {"MaxRuntimeInSeconds": spec.max_run,
                              **({"MaxWaitTimeInSeconds": max_wait} if spec.spot else {})},
        "EnableManagedSpotTraining": spec.spot,
        "CheckpointConfig": {"S3Uri": checkpoint, "LocalPath": CHECKPOINT_DIR},
    }
    if channels:
        request["InputDataConfig"] = channels
    return SageMakerJob(spec, request, run_name, region, code_uri, config_path, hps, notes)


def _channel(text: str) -> tuple[str, str]:
    name, sep, uri = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise ConfigError(f"--channel {text!r}: write NAME=s3://BUCKET/PREFIX (on the instance: "
                          "/opt/ml/input/data/NAME, e.g. --set align.base=/opt/ml/input/data/NAME)")
    return name, uri


# --------------------------------------------------------------------------------------------------
# The source bundle
# --------------------------------------------------------------------------------------------------


def requirements(recipe: str) -> list[str]:
    """byollm's installed dependencies for a recipe (core plus its extras), without torch: the image has its own
    CUDA build, and pip must not replace it."""
    try:
        declared = importlib.metadata.requires("byollm") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ByollmError("byollm is not installed as a package; run `pip install -e .` first") from e
    wanted, out, todo = set(), [], [None, *RECIPE_EXTRAS.get(recipe, DEFAULT_EXTRAS)]
    while todo:
        extra = todo.pop(0)
        if extra in wanted:
            continue
        wanted.add(extra)
        for line in declared:
            spec, _, marker = line.partition(";")
            m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
            if (m.group(1) if m else None) != extra:
                continue
            name = re.split(r"[\s\[<>=!~;]", spec.strip(), maxsplit=1)[0]
            if name == "byollm":  # byollm[hf]: another of our extras
                todo += re.findall(r"[\w-]+", spec.split("[", 1)[1]) if "[" in spec else []
            elif name != "torch" and spec.strip() not in out:
                out.append(spec.strip())
    return out


def bundle_files(job: SageMakerJob) -> dict[str, Path | bytes]:
    """What goes into sourcedir.tar.gz (/opt/ml/code on the instance), by the name it has there."""
    import byollm

    package = Path(byollm.__file__).resolve().parent
    files: dict[str, Path | bytes] = {ENTRY_POINT: Path(__file__).with_name("sagemaker_entry.py"),
                                      job.config_path: Path(job.spec.config),
                                      "requirements.txt": ("\n".join(requirements(job.spec.recipe)) + "\n").encode()}
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            files[f"byollm/{path.relative_to(package).as_posix()}"] = path
    return files


def write_bundle(job: SageMakerJob, path: str | Path) -> Path:
    """Write the source bundle, a gzipped tar like the SDK's sourcedir.tar.gz."""
    path = Path(path)
    with tarfile.open(path, "w:gz") as tar:
        for name, src in bundle_files(job).items():
            if isinstance(src, Path):
                tar.add(src, arcname=name)
            else:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(src), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(src))
    return path


# --------------------------------------------------------------------------------------------------
# What it costs, and what a dry run shows
# --------------------------------------------------------------------------------------------------


def cost_estimate(spec: SageMakerSpec) -> str:
    """A table of list prices times instances times the max run, on demand and with the assumed spot discount."""
    hours = spec.max_run / 3600
    n, off = spec.instance_count, spec.spot_discount
    lines = [f"Cost estimate: {n} instance(s) x {hours:g} h (--max-run, the most the job may run; SageMaker bills "
             "per second of training)",
             f"  prices: SageMaker training, on demand, us-east-1, USD per instance-hour: {PRICES_TAKEN}",
             f"  spot: an ASSUMED {off:.0%} discount (SageMaker says managed spot saves up to 90%; the real one varies "
             "by instance, region and time; --spot-discount changes it)",
             f"  {'instance':<19} {'accelerators':<26} {'$/hour':>8} {'on demand':>12} {'spot (est.)':>12}"]
    rows = dict(INSTANCES)
    if spec.price_per_hour is not None:
        rows[spec.instance_type] = (spec.price_per_hour, 0, "(your --price-per-hour)")
    for name, (price, _, accel) in rows.items():
        mark = "*" if name == spec.instance_type else " "
        lines.append(f"{mark} {name:<19} {accel:<26} {price:>8.2f} {price * n * hours:>12,.0f} "
                     f"{price * (1 - off) * n * hours:>12,.0f}")
    if spec.instance_type in rows:
        price = rows[spec.instance_type][0]
        total = price * n * hours * ((1 - off) if spec.spot else 1)
        how = f"spot, at the assumed {off:.0%} off" if spec.spot else "on demand"
        lines.append(f"This job ({spec.instance_type}, {how}): at most about ${total:,.0f} in instance time, "
                     "plus S3 storage and transfer")
    else:
        lines.append(f"No list price here for {spec.instance_type}: pass --price-per-hour USD to estimate it")
    return "\n".join(lines)


def describe(job: SageMakerJob) -> str:
    """The dry run: the request, the bundle, the command each node runs, the cost."""
    spec = job.spec
    gpus = INSTANCES.get(spec.instance_type, (0, 0, ""))[1]
    env = {"SM_HOSTS": json.dumps([f"algo-{i + 1}" for i in range(spec.instance_count)]),
           "SM_CURRENT_HOST": "algo-1", "SM_NUM_GPUS": str(gpus), "SM_HPS": json.dumps(job.hyperparameters)}
    command = " ".join(torchrun_command(env))
    if not gpus:
        command = command.replace("--nproc_per_node 1", "--nproc_per_node $SM_NUM_GPUS", 1)
    files = bundle_files(job)
    size = sum(len(s) if isinstance(s, bytes) else s.stat().st_size for s in files.values())
    text = [f"Dry run: nothing was sent to AWS. The CreateTrainingJob request ({job.region}):",
            json.dumps(job.request, indent=2), "",
            f"Source bundle: {len(files)} files, {size / 1e6:.1f} MB before compression, to be uploaded to "
            f"{job.code_uri} (the entry {ENTRY_POINT}, the byollm package, {job.config_path}, requirements.txt)",
            f"Node 1 of {spec.instance_count} runs (algo-N runs the same with --node_rank N-1):", f"  {command}",
            f"Checkpoints: {CHECKPOINT_DIR}/{job.run_name} on the instances <-> "
            f"{job.request['CheckpointConfig']['S3Uri']}/{job.run_name}"]
    if spec.spot:
        text.append("Spot: an interrupted job restarts by itself within --max-wait and resumes from the newest "
                    "checkpoint that reached S3 (keep checkpoint_interval short enough to lose little)")
    text += [f"Note: {n}" for n in job.notes]
    return "\n".join([*text, "", cost_estimate(spec)])


# --------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------


def launch(job: SageMakerJob, session: Any = None) -> str:
    """Upload the source bundle and create the training job; returns its ARN."""
    import tempfile

    boto3 = require("boto3", "cloud")
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    session = session or boto3.session.Session(region_name=job.region)
    bucket, key = _s3(job.code_uri, "--output-s3")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            session.client("s3").upload_file(str(write_bundle(job, Path(tmp) / "sourcedir.tar.gz")), bucket, key)
        return session.client("sagemaker").create_training_job(**job.request)["TrainingJobArn"]
    except (ClientError, BotoCoreError, Boto3Error) as e:
        raise ByollmError(f"AWS refused the job: {' '.join(str(e).split())} (check your credentials, --role and "
                          "that the S3 buckets exist in --region)") from e


def add_sagemaker_arguments(p: Any) -> None:
    """The options of `byollm cloud sagemaker` (the parser lives in byollm.cli; the options with the code)."""
    opt = Optional  # noqa: UP045 - jsonargparse wants typing's Optional here
    p.add_argument("config", type=str, help="the recipe's YAML config (e.g. configs/gpt2-124m-fineweb.yaml), "
                   "checked here and shipped with the job")
    p.add_argument("--recipe", type=Literal[RECIPES], default="pretrain", help="the byollm verb the job runs")
    p.add_argument("--instance-type", "--instance_type", type=str, default="ml.g5.xlarge",
                   help="SageMaker instance type, e.g. ml.g5.xlarge, ml.p4d.24xlarge, ml.p5.48xlarge")
    p.add_argument("--instance-count", "--instance_count", type=int, default=1,
                   help="instances (nodes); torchrun runs one process per GPU on each")
    p.add_argument("--spot", action="store_true", help="managed spot training: cheaper, may be interrupted and "
                   "resumed from the newest checkpoint")
    p.add_argument("--max-run", "--max_run", type=int, default=86400, help="longest training time in seconds")
    p.add_argument("--max-wait", "--max_wait", type=opt[int], default=None,
                   help="with --spot: longest total time, training plus waiting for capacity (default 2x --max-run)")
    p.add_argument("--data", type=opt[str], default=None, help="s3://BUCKET/PREFIX: the 'data' channel, the run's "
                   "BYOLLM_DATA_MIRROR on the instance (e.g. holding fineweb-edu/*.parquet)")
    p.add_argument("--input-mode", "--input_mode", type=Literal["File", "FastFile"], default="File",
                   help="File: data copied to the instance before training; FastFile: streamed from S3")
    p.add_argument("--channel", type=str, action="append", default=None,
                   help="another S3 channel, NAME=s3://... (repeatable): on the instance /opt/ml/input/data/NAME")
    p.add_argument("--checkpoint-s3", "--checkpoint_s3", type=opt[str], default=None,
                   help="s3://BUCKET/PREFIX the checkpoints sync to (and a restarted job resumes from)")
    p.add_argument("--output-s3", "--output_s3", type=opt[str], default=None,
                   help="s3://BUCKET/PREFIX for the job's output and source bundle (default: --checkpoint-s3's "
                   "bucket, byollm-jobs/)")
    p.add_argument("--role", type=opt[str], default=None, help=f"the SageMaker execution role's ARN (or "
                   f"${ROLE_ENV}); it needs S3 access to the buckets")
    p.add_argument("--image-uri", "--image_uri", type=opt[str], default=None,
                   help="training image; default: the AWS PyTorch training container of --framework-version")
    p.add_argument("--framework-version", "--framework_version", type=str, default="2.8.0",
                   help=f"PyTorch version of the default image: {', '.join(DLC_PY_VERSIONS)}")
    p.add_argument("--py-version", "--py_version", type=opt[str], default=None,
                   help="Python of the default image, e.g. py312 (default: the one of --framework-version)")
    p.add_argument("--job-name", "--job_name", type=opt[str], default=None,
                   help="unique job name (default byollm-RUN-DATE-TIME)")
    p.add_argument("--region", type=opt[str], default=None, help="AWS region (default $AWS_REGION or your AWS config)")
    p.add_argument("--volume-size", "--volume_size", type=int, default=100,
                   help="GB of disk per instance (File-mode data lands there)")
    p.add_argument("--set", type=str, action="append", default=None,
                   help="a config override KEY=VALUE for the run (repeatable), e.g. --set grad_accum=2")
    p.add_argument("--price-per-hour", "--price_per_hour", type=opt[float], default=None,
                   help="USD per instance-hour for the cost estimate (the built-in prices date; see --dry-run)")
    p.add_argument("--spot-discount", "--spot_discount", type=float, default=ASSUMED_SPOT_DISCOUNT,
                   help="assumed spot discount for the estimate, a fraction (0.7: 70 percent off)")
    p.add_argument("--dry-run", "--dry_run", action="store_true",
                   help="print the job definition and the cost estimate; call nothing")


def spec_from_args(a: Any) -> SageMakerSpec:
    """The spec from `byollm cloud sagemaker`'s parsed arguments."""
    names = {f.name for f in dataclasses.fields(SageMakerSpec)} - {"channels", "overrides"}
    return SageMakerSpec(**{n: a[n] for n in names if n in a}, channels=list(a.channel or []),
                         overrides=list(a.set or []))


__all__ = ["INSTANCES", "PRICES_TAKEN", "RECIPES", "SageMakerJob", "SageMakerSpec", "add_sagemaker_arguments",
           "bundle_files", "cost_estimate", "describe", "image_uri", "launch", "plan_job", "recipe_config_class",
           "requirements", "spec_from_args", "write_bundle"]
