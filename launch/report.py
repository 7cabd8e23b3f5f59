"""Print training runs' final evaluations side by side (veclip_jax/cli/report.py):
python launch/report.py workdir/demo_alttext workdir/demo_mixed workdir/demo_vecap"""

from veclip_jax.cli.report import run

if __name__ == "__main__":
    run()
