"""The input throughput script runs end to end and reports a rate per configuration."""

from __future__ import annotations

import re

from veclip_jax.bench import input as bench_input


def test_input_benchmark_prints_records_per_second(tmp_path, capsys):
    bench_input.main(
        [
            "--seconds=0.3",
            "--datasets=demo,photo",
            "--num_photos=8",
            "--workers=1",
            "--decoders=simplejpeg",
            f"--cache_dir={tmp_path}",
        ]
    )
    out = capsys.readouterr().out
    rows = re.findall(r"^(demo|photo) .*?(\d+)$", out, flags=re.M)
    # Per dataset: decode-only, 1 thread, 1 worker process.
    assert [name for name, _ in rows] == ["demo"] * 3 + ["photo"] * 3
    assert all(int(rate) > 0 for _, rate in rows)
