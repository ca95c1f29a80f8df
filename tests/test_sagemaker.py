"""`byollm cloud sagemaker`, offline: the entry script's torchrun command (checked by torchrun's own parser and by
our CLI's), the CreateTrainingJob request (checked by botocore against the SageMaker service model with Stubber),
and a whole launch against moto's S3 and SageMaker (the bundle uploaded, the job created and described back).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from byollm.cli import build_parser, main
from byollm.config import instantiate
from byollm.errors import ConfigError
from byollm.scale import sagemaker
from byollm.scale.sagemaker_entry import CHECKPOINT_DIR, EntryError, run_environment, torchrun_command

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/gpt2-124m-fineweb.yaml"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
GUIDE_ARGS = ["cloud", "sagemaker", CONFIG, "--instance-type", "ml.p4d.24xlarge", "--instance-count", "2", "--spot",
              "--max-run", "86400", "--data", "s3://my-bucket/fineweb", "--checkpoint-s3", "s3://my-bucket/ckpt",
              "--role", ROLE, "--region", "us-east-1"]


def torchrun_args(cmd: list[str]) -> Any:
    """Parse a torchrun command line with torchrun's own parser; every flag must be one of its option strings
    exactly (argparse would accept an abbreviation of a flag, so a typo could pass the parse alone)."""
    from torch.distributed.run import get_args_parser

    assert cmd[0] == "torchrun", cmd
    parser = get_args_parser()
    known = {o for a in parser._actions for o in a.option_strings}
    launcher = cmd[1:cmd.index("-m") + 2] if "-m" in cmd else cmd[1:]
    flags = [w.split("=")[0] for w in launcher if w.startswith("-")]
    assert set(flags) <= known, f"not torchrun flags: {set(flags) - known}"
    return parser.parse_args(cmd[1:])


@pytest.fixture(autouse=True)
def _fake_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials, no AWS config files, no role from the environment: nothing can reach a real account."""
    monkeypatch.chdir(ROOT)
    fake = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    for k, v in fake.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", sagemaker.ROLE_ENV):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def parser() -> Any:
    return build_parser()


def plan(parser: Any, *args: str, dry_run: bool = False,
         environ: dict[str, str] | None = None) -> sagemaker.SageMakerJob:
    """The job `byollm cloud sagemaker ARGS` plans, through the real parser."""
    ns = instantiate(parser, parser.parse_args(list(args)))
    a = ns["cloud"]["sagemaker"]
    return sagemaker.plan_job(sagemaker.spec_from_args(a), dry_run=dry_run, environ=environ or {}, now=0)


# --------------------------------------------------------------------------------------------------
# The entry script: SageMaker's environment -> torchrun
# --------------------------------------------------------------------------------------------------


def sm_env(host: str = "algo-2", hosts: tuple[str, ...] = ("algo-1", "algo-2", "algo-3"), gpus: int = 8,
           **hps: Any) -> dict[str, str]:
    return {"SM_HOSTS": json.dumps(list(hosts)), "SM_CURRENT_HOST": host, "SM_NUM_GPUS": str(gpus),
            "SM_CHANNEL_DATA": "/opt/ml/input/data/data",
            "SM_HPS": json.dumps({"recipe": "pretrain", "config": CONFIG, "name": "gpt2-124m-fineweb",
                                  "overrides": ["--grad_accum", "2"], **hps})}


def test_entry_builds_the_torchrun_command_of_its_node(parser: Any) -> None:
    cmd = torchrun_command(sm_env())
    assert cmd == ["torchrun", "--nnodes", "3", "--nproc_per_node", "8", "--node_rank", "1", "--master_addr", "algo-1",
                   "--master_port", "29500", "-m", "byollm.cli", "pretrain", "--config", CONFIG, "--out_dir",
                   CHECKPOINT_DIR, "--name", "gpt2-124m-fineweb", "--resume", "true", "--grad_accum", "2"]
    args = torchrun_args(cmd)  # torchrun reads it as meant
    assert (args.nnodes, args.nproc_per_node, args.node_rank, args.master_addr, args.master_port) == \
        ("3", "8", 1, "algo-1", 29500)
    assert args.module and args.training_script == "byollm.cli"
    # ... and so does byollm: the recipe's config with the launcher's overrides
    from byollm.commands import recipe_config

    ns = instantiate(parser, parser.parse_args(args.training_script_args))
    cfg = recipe_config("pretrain", ns["pretrain"])
    assert (cfg.out_dir, cfg.name, cfg.resume, cfg.grad_accum, cfg.max_steps) == \
        (CHECKPOINT_DIR, "gpt2-124m-fineweb", True, 2, 19073)


def test_entry_ranks_agree_across_nodes_and_cpu_nodes_run_one_process() -> None:
    hosts = ("algo-2", "algo-1")  # whatever order SM_HOSTS lists them in, every node sorts the same way
    ranks = [torchrun_command(sm_env(host=h, hosts=hosts)) for h in ("algo-1", "algo-2")]
    assert [torchrun_args(c).node_rank for c in ranks] == [0, 1]
    assert {torchrun_args(c).master_addr for c in ranks} == {"algo-1"}
    assert torchrun_args(torchrun_command(sm_env(gpus=0))).nproc_per_node == "1"
    # a toolkit that leaves the overrides JSON-encoded
    assert torchrun_command(sm_env(overrides='["--lr", "1e-4"]'))[-2:] == ["--lr", "1e-4"]


def test_entry_refuses_an_environment_sagemaker_did_not_set_up() -> None:
    with pytest.raises(EntryError, match="SM_HOSTS"):
        torchrun_command({"SM_CURRENT_HOST": "algo-1"})
    with pytest.raises(EntryError, match="not in SM_HOSTS"):
        torchrun_command(sm_env(host="algo-9"))
    env = sm_env()
    env["SM_HPS"] = json.dumps({"recipe": "pretrain"})
    with pytest.raises(EntryError, match="config, name"):
        torchrun_command(env)


def test_entry_makes_the_data_channel_the_data_mirror() -> None:
    env = run_environment(sm_env())
    assert env["BYOLLM_DATA_MIRROR"] == "/opt/ml/input/data/data" and env["SM_CURRENT_HOST"] == "algo-2"
    assert "BYOLLM_DATA_MIRROR" not in run_environment({"SM_HOSTS": "[]"})


def test_entry_script_runs_torchrun_with_that_command(tmp_path: Path) -> None:
    # The file SageMaker runs, as a script, with a stand-in `torchrun` on PATH that records what it got.
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    got = tmp_path / "got"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump([sys.argv[1:], os.environ.get('BYOLLM_DATA_MIRROR')], open({str(got)!r}, 'w'))\n"
                    "sys.exit(3)\n")
    fake.chmod(0o755)
    env = {**sm_env(), "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    script = ROOT / "byollm" / "scale" / "sagemaker_entry.py"
    r = subprocess.run([sys.executable, str(script), "--recipe", "pretrain"], env=env, capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 3, r.stderr  # torchrun's exit status is the job's
    argv, mirror = json.loads(got.read_text())
    assert ["torchrun", *argv] == torchrun_command(sm_env()) and mirror == "/opt/ml/input/data/data"
    assert "sagemaker_entry: torchrun --nnodes 3" in r.stdout


# --------------------------------------------------------------------------------------------------
# The request
# --------------------------------------------------------------------------------------------------


def test_the_request_carries_the_job(parser: Any) -> None:
    job = plan(parser, *GUIDE_ARGS, "--set", "batch_size=32")
    r = job.request
    assert r["ResourceConfig"] == {"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 2, "VolumeSizeInGB": 100}
    assert r["EnableManagedSpotTraining"] is True
    assert r["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400, "MaxWaitTimeInSeconds": 2 * 86400}
    assert r["CheckpointConfig"] == {"S3Uri": "s3://my-bucket/ckpt", "LocalPath": "/opt/ml/checkpoints"}
    assert r["InputDataConfig"] == [{"ChannelName": "data", "InputMode": "File", "DataSource": {"S3DataSource": {
        "S3DataType": "S3Prefix", "S3Uri": "s3://my-bucket/fineweb", "S3DataDistributionType": "FullyReplicated"}}}]
    assert r["RoleArn"] == ROLE and r["OutputDataConfig"] == {"S3OutputPath": "s3://my-bucket/byollm-jobs"}
    assert r["AlgorithmSpecification"] == {"TrainingInputMode": "File", "TrainingImage":
                                           "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.8.0-gpu-py312"}
    assert r["TrainingJobName"] == "byollm-gpt2-124m-fineweb-19700101-000000"
    hps = {k: json.loads(v) for k, v in r["HyperParameters"].items()}  # JSON-encoded, as the SDK sends them
    assert hps == {"recipe": "pretrain", "config": CONFIG, "name": "gpt2-124m-fineweb",
                   "overrides": ["--batch_size", "32"], "sagemaker_program": "sagemaker_entry.py",
                   "sagemaker_submit_directory": "s3://my-bucket/byollm-jobs/byollm-gpt2-124m-fineweb-19700101-000000/"
                                                 "source/sourcedir.tar.gz",
                   "sagemaker_container_log_level": 20, "sagemaker_job_name": r["TrainingJobName"],
                   "sagemaker_region": "us-east-1"}
    assert job.code_uri == hps["sagemaker_submit_directory"]


def test_botocore_accepts_the_request_as_the_service_model_defines_it(parser: Any) -> None:
    import boto3
    from botocore.exceptions import ParamValidationError
    from botocore.stub import Stubber
    from botocore.validate import validate_parameters

    job = plan(parser, *GUIDE_ARGS, "--channel", "base=s3://my-bucket/models/base", "--input-mode", "FastFile")
    client = boto3.client("sagemaker", region_name="us-east-1")
    shape = client.meta.service_model.operation_model("CreateTrainingJob").input_shape
    validate_parameters(job.request, shape)  # required members, types, ranges of the SageMaker service model
    arn = "arn:aws:sagemaker:us-east-1:123456789012:training-job/" + job.request["TrainingJobName"]
    with Stubber(client) as stub:  # the client sends exactly this request (and nothing else)
        stub.add_response("create_training_job", {"TrainingJobArn": arn}, expected_params=job.request)
        assert client.create_training_job(**job.request)["TrainingJobArn"] == arn
        stub.assert_no_pending_responses()
    assert [c["ChannelName"] for c in job.request["InputDataConfig"]] == ["data", "base"]
    assert {c["InputMode"] for c in job.request["InputDataConfig"]} == {"FastFile"}
    # the validation is real: a request off the model is refused
    bad = {**job.request, "ResourceConfig": {**job.request["ResourceConfig"], "InstanceCount": "2"}}
    with pytest.raises(ParamValidationError, match="InstanceCount"):
        validate_parameters(bad, shape)
    with pytest.raises(ParamValidationError, match="OutputDataConfig"):
        validate_parameters({k: v for k, v in job.request.items() if k != "OutputDataConfig"}, shape)


def test_launch_uploads_the_bundle_and_creates_the_job_in_moto(parser: Any, tmp_path: Path) -> None:
    import boto3
    from moto import mock_aws

    job = plan(parser, *GUIDE_ARGS)
    with mock_aws():
        session = boto3.session.Session(region_name="us-east-1")
        session.client("s3").create_bucket(Bucket="my-bucket")
        arn = sagemaker.launch(job, session=session)
        assert arn.endswith(":training-job/" + job.request["TrainingJobName"])
        key = job.code_uri.removeprefix("s3://my-bucket/")
        body = session.client("s3").get_object(Bucket="my-bucket", Key=key)["Body"].read()
        got = session.client("sagemaker").describe_training_job(TrainingJobName=job.request["TrainingJobName"])
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        names = set(tar.getnames())
        requirements = tar.extractfile("requirements.txt").read().decode().split()
        config = tar.extractfile(CONFIG).read()
        entry = tar.extractfile("sagemaker_entry.py").read()
    assert {"byollm/cli.py", "byollm/scale/sagemaker_entry.py", "byollm/train/pretrain.py"} <= names
    assert not any("__pycache__" in n for n in names)
    assert config == (ROOT / CONFIG).read_bytes() and entry == (ROOT / "byollm/scale/sagemaker_entry.py").read_bytes()
    assert not any(r.split("<")[0].split(">")[0].split("=")[0] == "torch" for r in requirements)  # the image's stays
    assert any(r.startswith("datasets") for r in requirements) and any(r.startswith("tokenizers") for r in requirements)
    for key in ("ResourceConfig", "StoppingCondition", "CheckpointConfig", "InputDataConfig", "HyperParameters",
                "EnableManagedSpotTraining", "AlgorithmSpecification", "RoleArn"):
        want = job.request[key]
        assert (got[key] if not isinstance(want, dict) else {k: got[key][k] for k in want}) == want, key


def test_launch_without_the_bucket_is_one_clear_error(parser: Any) -> None:
    import boto3
    from moto import mock_aws

    from byollm.errors import ByollmError

    with mock_aws(), pytest.raises(ByollmError, match="AWS refused the job: .*NoSuchBucket"):
        sagemaker.launch(plan(parser, *GUIDE_ARGS), session=boto3.session.Session(region_name="us-east-1"))


# --------------------------------------------------------------------------------------------------
# The dry run and its cost estimate; mistakes caught before anything starts
# --------------------------------------------------------------------------------------------------


def test_dry_run_prints_the_request_and_the_cost(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*GUIDE_ARGS, "--dry-run"]) == 0
    out = capsys.readouterr().out
    request = json.loads(out[out.index("{"):out.index("\n}\n") + 2])
    assert request["ResourceConfig"]["InstanceCount"] == 2 and request["EnableManagedSpotTraining"] is True
    price = sagemaker.INSTANCES["ml.p4d.24xlarge"][0]
    assert f"${price * 2 * 24 * 0.3:,.0f} in instance time" in out  # 2 instances x 24 h x (1 - 70%)
    assert f"{price * 2 * 24:,.0f}" in out and "ASSUMED 70% discount" in out and "as of 2024" in out
    assert "torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --master_addr algo-1" in out


def test_cost_estimate_uses_a_given_price_and_marks_unknown_instances() -> None:
    spec = sagemaker.SageMakerSpec(CONFIG, instance_type="ml.g6.xlarge", max_run=7200, instance_count=3)
    assert "No list price here for ml.g6.xlarge" in sagemaker.cost_estimate(spec)
    spec.price_per_hour = 1.5
    assert "at most about $9 in instance time" in sagemaker.cost_estimate(spec)  # 1.5 x 3 x 2 h, on demand


def test_dry_run_without_role_or_region_shows_placeholders(parser: Any) -> None:
    args = [a for a in GUIDE_ARGS if a not in (ROLE, "--role", "--region", "us-east-1")]
    job = plan(parser, *args, dry_run=True)
    assert job.request["RoleArn"] == sagemaker.PLACEHOLDER_ROLE and job.region == "us-east-1"
    assert len(job.notes) == 2
    job = plan(parser, *args, dry_run=True, environ={"SAGEMAKER_ROLE": ROLE, "AWS_REGION": "ap-east-1"})
    assert job.request["RoleArn"] == ROLE and not job.notes
    assert job.request["AlgorithmSpecification"]["TrainingImage"].startswith("871362719292.dkr.ecr.ap-east-1.")


@pytest.mark.parametrize(("change", "message"), [
    (["--role", None], "no IAM role: pass --role"),
    (["--role", "SageMakerRole"], "not an IAM role ARN"),
    (["--instance-type", "ml.p4d.24xl"], "did you mean ml.p4d.24xlarge"),
    (["--max-wait", "3600"], "shorter than --max-run"),
    (["--max-run", str(29 * 86400)], "28 days"),
    (["--checkpoint-s3", "my-bucket/ckpt"], "not an S3 URI"),
    (["--set", "max_stpes=3"], "max_steps"),
    (["--set", "out_dir=/tmp"], "the launcher sets it"),
    (["--job-name", "my_job"], "--job-name my_job"),
    (["--channel", "base"], "NAME=s3://"),
    (["--instance-type", "ml.trn1.32xlarge"], "Neuron image"),
    (["--framework-version", "1.0"], "no PyTorch training image"),
])
def test_mistakes_are_one_line_before_anything_starts(parser: Any, change: list[str | None], message: str) -> None:
    args = list(GUIDE_ARGS)
    if change[0] in args:
        i = args.index(change[0])
        args[i:i + 2] = [] if change[1] is None else change
    else:
        args += change
    with pytest.raises(ConfigError, match=message) as e:
        plan(parser, *args)
    assert "\n" not in str(e.value)


def test_a_missing_role_through_the_cli_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = [a for a in GUIDE_ARGS if a not in (ROLE, "--role")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("byollm: error: no IAM role") and err.count("\n") == 1


def test_requirements_leave_torch_to_the_image() -> None:
    pretrain = sagemaker.requirements("pretrain")
    names = [r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0] for r in pretrain]
    assert "torch" not in names and {"numpy", "tokenizers", "jsonargparse", "datasets"} <= set(names)
    finetune = " ".join(sagemaker.requirements("finetune"))
    assert "peft" in finetune and "transformers" in finetune  # finetune -> byollm[hf], followed
