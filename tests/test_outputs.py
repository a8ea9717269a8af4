"""qatflow.outputs: outputs checked before work, then committed all together or not at all."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from tests.s3_server import make_bucket, s3_endpoint

from qatflow.errors import StorageError
from qatflow.outputs import check_output, side_location, staged_outputs

__all__ = ["s3_endpoint"]


class Boom(Exception):
    pass


def test_side_location_keeps_uris() -> None:
    assert side_location("runs/q.keras", ".placement.md") == Path("runs/q.placement.md")
    assert side_location("s3://b/x/q.keras", ".calibration.json") == "s3://b/x/q.calibration.json"


def test_commit_moves_every_file_and_removes_stale_side_files(tmp_path: Path) -> None:
    output = tmp_path / "new" / "q.keras"
    output.parent.mkdir()
    stale = output.with_name("q.calibration.json")
    stale.write_text("old")
    names = ["q.placement.md", "q.calibration.json"]
    with staged_outputs(output, side_names=names) as out:
        out.side(".placement.md").write_text("placement")
        out.main.write_text("model")
        assert not output.exists()  # nothing in place before the step succeeds
    assert out.final == output and output.read_text() == "model"
    assert output.with_name("q.placement.md").read_text() == "placement"
    assert not stale.exists()
    assert sorted(p.name for p in output.parent.iterdir()) == ["q.keras", "q.placement.md"]


def test_a_failed_step_leaves_nothing(tmp_path: Path) -> None:
    output = tmp_path / "q.keras"
    with pytest.raises(Boom), staged_outputs(output) as out:
        out.side(".placement.md").write_text("placement")
        out.main.write_text("half")
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_outputs_that_cannot_be_written(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="is a folder"):
        check_output(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=f"{blocker} is a file, not a folder"):
        check_output(blocker / "deeper" / "q.keras")
    with pytest.raises(StorageError, match="cannot write"):
        check_output("/proc/qatflow-test/q.keras")


def test_output_equal_to_an_input(tmp_path: Path) -> None:
    model = tmp_path / "m.keras"
    model.write_text("x")
    with pytest.raises(StorageError, match="--overwrite"):
        check_output(model, inputs=[model], overwrite=False)
    with pytest.raises(StorageError, match="give another --output$"):
        check_output(tmp_path / "." / "m.keras", inputs=[model])  # no --overwrite to offer
    check_output(model, inputs=[model], overwrite=True)


def test_engine_sidecar_names_are_refused(tmp_path: Path) -> None:
    engine = tmp_path / "m.engine.onnx"
    engine.write_bytes(b"x")
    with pytest.raises(StorageError, match="sidecar name of the engine"):
        check_output(f"{engine}.json")
    check_output(tmp_path / "other.json")


def test_s3_outputs_upload_after_success(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = make_bucket(s3_endpoint)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    with pytest.raises(Boom), staged_outputs(f"s3://{bucket}/a/q.keras") as out:
        out.main.write_text("half")
        raise Boom
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)
    with staged_outputs(f"s3://{bucket}/a/q.keras") as out:
        out.side(".placement.md").write_text("placement")
        out.main.write_text("model")
    assert out.final == f"s3://{bucket}/a/q.keras"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"a/q.keras", "a/q.placement.md"}
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        check_output("s3://no-such-bucket-x/q.keras")
    with pytest.raises(StorageError, match="names no object"):
        check_output(f"s3://{bucket}/folder/")
