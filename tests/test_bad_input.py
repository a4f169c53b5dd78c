"""Bad input: the JSON-lines reader and its file:line messages, and skipped samples, each listed once (with
where it happened), written as JSON lines, kept across a resume and across ranks."""
import json

import pytest
import torch

from finelap.bad_input import MetadataError, Skip, SkipCounter, gather_skips, json_object, read_json_lines
from tests.train_fixtures import spawn_ranks


def _skip(key: str, reason: str = "audio_truncated") -> Skip:
    return Skip(key, reason, f"{key}: clip.wav: {reason}")


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- JSON lines


def test_json_lines_are_read_with_their_file_and_line_and_bad_ones_named(tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text('{"a": 1}\n\n   \n[1, 2]\n{"a": }\n{"b": 2}\n')
    lines = list(read_json_lines(path))
    assert [location for location, _ in lines] == [f"{path}:{number}" for number in (1, 4, 5, 6)]  # no blank line
    assert lines[0][1] == {"a": 1} and lines[1][1] == [1, 2] and lines[3][1] == {"b": 2}
    assert isinstance(lines[2][1], json.JSONDecodeError)  # reading goes on past a line that is not JSON

    assert json_object(lines[0][1], lines[0][0], "a record") == {"a": 1}
    with pytest.raises(MetadataError, match=rf"^{path}:4: a record must be a JSON object, got list$") as caught:
        json_object(lines[1][1], lines[1][0], "a record")
    assert caught.value.reason == "wrong_type" and caught.value.location == f"{path}:4"
    with pytest.raises(MetadataError, match=rf"^{path}:5: malformed JSON: Expecting value \(column 7\)$") as caught:
        json_object(lines[2][1], lines[2][0], "a record")
    assert caught.value.reason == "malformed_json"
    assert caught.value.as_problem().kind == "malformed_json"


# ---------------------------------------------------------------- the counter


def test_every_skipped_sample_is_listed_once_with_where_it_happened(tmp_path):
    skips = SkipCounter()
    skips.record(_skip("m.jsonl:4"), epoch=0, batch=3)
    skips.record(_skip("m.jsonl:4"), epoch=1, batch=0)  # the same clip failing again next epoch
    skips.record(_skip("m.jsonl:9", "malformed_json"))  # read while loading: no epoch or batch
    expected = [
        {"key": "m.jsonl:4", "reason": "audio_truncated", "message": "m.jsonl:4: clip.wav: audio_truncated",
         "epoch": 0, "batch": 3},
        {"key": "m.jsonl:9", "reason": "malformed_json", "message": "m.jsonl:9: clip.wav: malformed_json"},
    ]
    assert skips.listed == expected
    assert skips.counts == {"audio_truncated": 1, "malformed_json": 1} and skips.keys == {"m.jsonl:4", "m.jsonl:9"}
    assert _jsonl(skips.write_jsonl(tmp_path / "run" / "skipped.jsonl")) == expected
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["skipped.jsonl"]  # no temporary file left


def test_a_resumed_counter_neither_relists_nor_loses_a_skip(tmp_path):
    before = SkipCounter()
    before.record(_skip("m.jsonl:2"), epoch=0, batch=1)
    before.record(_skip("m.jsonl:5", "audio_empty"), epoch=0, batch=4)
    torch.save({"skips": before.state_dict()}, tmp_path / "state.pt")  # as a checkpoint's client state

    resumed = SkipCounter()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["skips"])
    resumed.record(_skip("m.jsonl:2"), epoch=1, batch=0)  # the resumed run meets the same clip again
    resumed.record(_skip("m.jsonl:7"), epoch=1, batch=2)
    assert resumed.listed == before.listed + [
        {"key": "m.jsonl:7", "reason": "audio_truncated", "message": "m.jsonl:7: clip.wav: audio_truncated",
         "epoch": 1, "batch": 2}
    ]
    assert resumed.counts == {"audio_empty": 1, "audio_truncated": 2}

    # a checkpoint from before skips were listed: counted and not re-counted, nothing to list
    old = SkipCounter()
    old.load_state_dict({"seen": ["m.jsonl:2"], "counts": {"audio_truncated": 1}})
    old.record(_skip("m.jsonl:2"))
    assert old.counts == {"audio_truncated": 1} and old.listed == []


def test_merge_adds_another_ranks_skips_once():
    rank0, rank1 = SkipCounter(), SkipCounter()
    rank0.record(_skip("m.jsonl:2"), epoch=0, batch=0)
    rank1.record(_skip("m.jsonl:3"), epoch=0, batch=1)
    rank1.record(_skip("m.jsonl:2"), epoch=1, batch=5)  # rank 1 met the clip rank 0 already listed
    rank0.merge(rank1.state_dict())
    assert [(entry["key"], entry["batch"]) for entry in rank0.listed] == [("m.jsonl:2", 0), ("m.jsonl:3", 1)]
    assert rank0.counts == {"audio_truncated": 2}


def _gather_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    skips = SkipCounter()
    skips.record(_skip("m.jsonl:1"), epoch=0, batch=0)  # both ranks met this clip
    skips.record(_skip(f"m.jsonl:{10 + rank}"), epoch=0, batch=rank)
    gather_skips(skips)
    torch.save(skips.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_gives_every_rank_the_skips_of_all_ranks(tmp_path):
    states = spawn_ranks(_gather_worker, tmp_path, 2, 120, "the 2 gloo ranks")
    assert states[0] == states[1]  # what rank 0 checkpoints holds every rank's skips
    assert [entry["key"] for entry in states[0]["listed"]] == ["m.jsonl:1", "m.jsonl:10", "m.jsonl:11"]
    assert states[0]["counts"] == {"audio_truncated": 3}
