"""The input throughput script: a records/s row for every configuration, measured after warm-up."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import types

from veclip_jax.bench import input as bench_input


def test_input_benchmark_prints_a_rate_for_every_configuration(tmp_path, capsys):
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
    rows = re.findall(r"^(demo 64px -> 32px|photo 500x375 -> 224px) +(\S+) +(.+?) +(\d+)$", out, flags=re.M)
    modes = ["decode+crop only, 1 thread", "1 thread in-process", "1 worker process"]
    assert [(name.split()[0], decoder, mode) for name, decoder, mode, _ in rows] == [
        (dataset, "simplejpeg", mode) for dataset in ("demo", "photo") for mode in modes
    ]


def test_measure_is_records_delivered_over_the_timed_seconds_after_warm_up(monkeypatch):
    # A fake clock that moves only when a batch of 64 records is delivered, 1/8 s per batch (exact in binary).
    clock, delivered = [0.0], []

    class Iterator:
        def __next__(self):
            clock[0] += 0.125
            delivered.append(64)
            return {"tokens": [0] * 64}

        def close(self):
            pass

    monkeypatch.setattr(bench_input, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench_input.pipeline, "make_train_iterator", lambda *a, **k: Iterator())
    rate = bench_input.measure(config=None, seconds=1.0, warmup_batches=3)
    assert len(delivered) == 3 + 8  # 3 warm-up batches (not timed), then 1 s of batches
    assert rate == 8 * 64 / 1.0


def test_input_benchmark_prints_a_rate_per_format_and_source_count(demo_cache, capsys):
    # In-process (0 workers) here, to keep the test short; the README's table uses 1 and 2 processes.
    bench_input.main(["--seconds=0.2", "--datasets=formats", "--num_photos=8", "--workers=0",
                      f"--cache_dir={demo_cache}"])  # fmt: skip
    out = capsys.readouterr().out
    rows = re.findall(r"^(.+?) +in-process, 1 thread +(\d+) +([\d.]+)$", out, flags=re.M)
    assert [label for label, _, _ in rows] == [label for label, _ in bench_input.FORMAT_ROWS]
    assert all(int(rate) > 0 and float(cpu) > 0 for _, rate, cpu in rows)


def test_cpu_time_counts_the_worker_processes():
    # The pipeline's work is in its worker processes: a child busy while this process sleeps counts.
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.6: pass\ntime.sleep(30)"])  # fmt: skip
    try:
        c0 = bench_input._cpu_seconds()
        time.sleep(1.5)  # the child burns 0.6 s of CPU, then sleeps (still alive, still counted)
        assert bench_input._cpu_seconds() - c0 > 0.4
    finally:
        child.kill()
        child.wait()
