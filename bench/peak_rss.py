"""Peak memory of a command and all its processes: the largest single process and the largest sum, sampled.

``/usr/bin/time -v`` reports one process; a torchrun job is several. This samples the RSS of the command's whole
process tree every 0.2 s and prints both peaks with the wall time.

    python bench/peak_rss.py grpo-math train --config recipes/smoke.yaml --dataset_name ../shared/data/gsm8k
    OMP_NUM_THREADS=1 python bench/peak_rss.py torchrun --nproc_per_node 2 -m grpo_math train \\
        --config recipes/smoke.yaml --per_device_train_batch_size 4
"""

import subprocess
import sys
import time

import psutil


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    start = time.perf_counter()
    child = subprocess.Popen(sys.argv[1:])
    root, total, single = psutil.Process(child.pid), 0, 0
    while child.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
        except psutil.Error:  # a process ended while being read
            continue
        total, single = max(total, sum(rss)), max(single, max(rss))
        time.sleep(0.2)
    print(
        f"exit {child.returncode}, {time.perf_counter() - start:.0f} s; peak RSS: largest process "
        f"{single / 1e9:.2f} GB, all processes together {total / 1e9:.2f} GB",
        file=sys.stderr,
    )
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
