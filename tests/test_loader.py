"""The indexed training loader: a global order from the indexes alone, each rank reading only
its own samples, exact resume, mixtures, and bad members."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from safevid.data_prep.rejects import Rejects

from safevid.data.indexed import GlobalOrder, IndexedStream, SampleRef, Source, load_index
from safevid.data.stream import expand_shards


def _refs(n_videos: int, pairs: int = 10, shards: int = 20) -> list[SampleRef]:
    return [SampleRef(f"s{i % shards}", f"v{i}", (0, 1), ((0, 1),), pairs) for i in range(n_videos)]


def test_order_covers_every_pair_and_mixes_videos_and_shards():
    refs = _refs(2000, pairs=10, shards=200)
    order = GlobalOrder([Source("train", refs, 128)], pairs_per_step=128, seed=0)
    steps = [order.step(s) for s in range(order.steps_per_epoch[0])]
    seen = Counter((i, p) for step in steps for _, i, p in step)
    assert len(seen) == 20000 and set(seen.values()) <= {1, 2}  # all, a few twice (last step)
    assert all(len(step) == 128 for step in steps)
    # Against a global permutation of all 20000 pairs (the ideal), per 128-pair step.
    everything = [(0, i, p) for i in range(2000) for p in range(10)]
    random.Random(0).shuffle(everything)
    ideal = [everything[j:j + 128] for j in range(0, 19968, 128)]

    def mean(steps_, f):
        return sum(len({f(i) for _, i, _ in step}) for step in steps_) / len(steps_)

    for f in (lambda i: i, lambda i: refs[i].shard):  # videos, then shards
        assert mean(steps, f) >= 0.95 * mean(ideal, f)
    # Defined by the step number alone: a fresh order (a resumed run) agrees at any step.
    again = GlobalOrder([Source("train", refs, 128)], pairs_per_step=128, seed=0)
    assert again.step(123) == steps[123] and again.step(400) == order.step(400)
    assert GlobalOrder([Source("train", refs, 128)], 128, seed=1).step(0) != steps[0]


def test_mixture_proportions_per_step():
    safety, general = _refs(300, shards=10), _refs(100, shards=5)
    order = GlobalOrder([Source("safety", safety, 12), Source("general", general, 4)],
                        pairs_per_step=16, seed=0)
    counts = Counter(si for s in range(50) for si, _, _ in order.step(s))
    assert counts[0] / (counts[0] + counts[1]) == pytest.approx(0.75, abs=0.01)


def test_each_rank_reads_only_its_share(demo_assets, monkeypatch):
    urls = expand_shards(str(demo_assets / "shards" / "train-*.tar"))
    read: list[str] = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        if str(path).endswith(".tar"):
            read.append(str(path))
        return real_open(path, *args, **kwargs)

    whole = IndexedStream([("train", urls, 1.0)], seed=0, pairs_per_step=12, groups=0)
    want = [[(p.id, p.video.key) for p in whole.step_pairs(0, 1)] for _ in range(5)]
    for world in (2, 3):
        streams = [IndexedStream([("train", urls, 1.0)], seed=0, pairs_per_step=12, groups=0)
                   for _ in range(world)]
        for step in range(5):
            got = []
            for rank, stream in enumerate(streams):
                monkeypatch.setattr("builtins.open", counting_open)
                read.clear()
                mine = stream.step_pairs(rank, world)
                monkeypatch.setattr("builtins.open", real_open)
                assert len(mine) == 12 // world  # the same forwards on every rank
                # Reads go only to the shards of this rank's own samples.
                refs = {r.key: r.shard for r in stream.order.sources[0].refs}
                assert set(read) <= {refs[p.video.key] for p in mine}
                got += [(p.id, p.video.key) for p in mine]
            assert got == want[step], f"world {world}, step {step}"


def test_resume_starts_at_its_step_without_reading_what_came_before(demo_assets):
    urls = expand_shards(str(demo_assets / "shards" / "train-*.tar"))
    run = IndexedStream([("train", urls, 1.0)], seed=3, pairs_per_step=8, groups=0)
    ids = [[p.id for p in run.step_pairs(0, 1)] for _ in range(40)]
    assert run.position == (40, 0)
    resumed = IndexedStream([("train", urls, 1.0)], seed=3, pairs_per_step=8, groups=0,
                            position=(37, 0))
    assert [[p.id for p in resumed.step_pairs(0, 1)] for _ in range(3)] == ids[37:]
    # Every pair of the epoch is met in its first ceil(pairs / 8) steps.
    total = sum(r.pairs for r in run.order.sources[0].refs)
    first = {i for step in ids[:-(-total // 8)] for i in step}
    assert len(first) == total


def test_member_index_sidecar_equals_the_tar_headers(demo_assets, tmp_path):
    from safevid.data_prep.shards import sidecar_path

    from safevid.data.indexed import _scan

    for url in expand_shards(str(demo_assets / "shards" / "*.tar")):
        side = sidecar_path(url)
        if side.is_file():
            assert json.loads(side.read_text()) == _scan(url)


def test_a_truncated_shard_rejects_its_samples_by_name_and_keeps_their_slots(demo_assets,
                                                                              tmp_path):
    good = sorted((demo_assets / "shards").glob("train-*.tar"))[0]
    refs = load_index([str(good)])
    last = max(refs, key=lambda r: r.json[0])  # the sample at the end of the file
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(good.read_bytes()[: last.jpgs[0][0] + 10])  # its frames torn
    rejects = Rejects(None, keep=True)
    # The index comes from the intact file, as a stale or copied index would.
    from safevid.data_prep.shards import member_index, sidecar_path

    sidecar_path(cut).write_text(json.dumps(member_index(good, {r.key: r.pairs for r in refs})))
    stream = IndexedStream([("train", [str(cut)], 1.0)], seed=0, pairs_per_step=4, groups=0,
                           rejects=rejects)
    pairs = [p for _ in range(stream.order.steps_per_epoch[0]) for p in stream.step_pairs(0, 1)]
    bad = [p for p in pairs if not p.valid]
    assert bad and all(p.video.key == last.key for p in bad)
    assert len(bad) == sum(p.video.key == last.key for p in pairs)
    assert [r["source"] for r in rejects.records] == [f"{cut}:{last.key}"]
    assert "truncated" in rejects.records[0]["reason"]


def test_mixture_of_shard_sets_reports_pairs_per_source(demo_assets):
    shards = demo_assets / "shards"
    a = expand_shards(str(shards / "train-000000.tar"))
    b = expand_shards(f"{shards}/train-00000{{1,2}}.tar,{shards}/train-000003.tar")
    assert len(b) == 3  # commas inside braces belong to the pattern
    stream = IndexedStream([("safety", a, 3.0), ("general", b, 1.0)], seed=0, pairs_per_step=16,
                           groups=0)
    for step in range(6):
        assert stream.step_sources(step) == {"safety": 12, "general": 4}
        names = {refs.key for refs in stream.order.sources[0].refs}
        mine = stream.step_pairs(0, 1)
        assert sum(p.video.key in names for p in mine) == 12
        assert {p.source for p in mine} == {"safety", "general"}


def test_mixture_groups_sum_to_the_step():
    from safevid.data.indexed import group_shares

    assert group_shares(64, [1, 1, 1]) == [22, 21, 21]
    assert sum(group_shares(128, [1.0] * 6)) == 128
    with pytest.raises(Exception, match="no group"):
        group_shares(4, [100, 1])


def test_shards_made_by_other_tools_are_read_as_webdataset_groups_them(demo_assets, tmp_path):
    """Members named `./clip.json` (tar -C dir -cf x.tar .), in a folder with a dot, with an
    upper-case extension: grouped as WebDataset groups them (directory and basename up to the
    first dot), so every sample keeps its JSON and frames. A compressed shard is refused with
    what to do (its offsets are not the file's); a loose glob skips the JSON sidecars."""
    import gzip
    import io
    import tarfile

    from safevid.data.indexed import read_sample

    good = sorted((demo_assets / "shards").glob("train-*.tar"))[0]
    want = {r.key: r.pairs for r in load_index([str(good)])}
    other = tmp_path / "other-000000.tar"
    with tarfile.open(good) as src, tarfile.open(other, "w") as dst:
        keys = sorted({m.name.split(".")[0] for m in src.getmembers()})
        for m in src.getmembers():
            data = src.extractfile(m).read()
            prefix = "./" if keys.index(m.name.split(".")[0]) % 2 else "clips.v2/"
            name = m.name if not m.name.endswith(".jpg") else m.name[:-4] + ".JPG"
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    refs = load_index([str(other)])
    assert sorted(r.pairs for r in refs) == sorted(want.values())
    assert all(r.json is not None and r.jpgs for r in refs)
    assert {r.key.split("/")[0] for r in refs} == {".", "clips.v2"}
    rejects = Rejects(None, keep=True)
    video = read_sample(refs[0], rejects)
    assert video is not None and not rejects.records and video.decode_error() is None

    packed = tmp_path / "packed-000000.tar"
    packed.write_bytes(gzip.compress(good.read_bytes()))
    with pytest.raises(tarfile.ReadError, match="not an uncompressed tar file.*data.loader=stream"):
        load_index([str(packed)])
    (tmp_path / "other-000000.idx.json").write_text("{}")
    assert expand_shards(str(tmp_path / "other-*")) == [str(other)]
