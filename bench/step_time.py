"""Step time of SP-NGD against momentum SGD under the same DeepSpeed config.

Step time of SP-NGD against momentum SGD under the same DeepSpeed config (ZeRO 0, fp32): the
entry point of the step-time regimes, each a module of its own over the shared ``driver.py``:

- ``small`` (default, ``step_time_small.py``): one micro-batch a step, SGD and SP-NGD with
  staleness off and on taking turns; CPU: CIFAR-style ResNet-20 on 32x32 digits (3 channels), 32
  per rank, 2 gloo ranks; CUDA: torchvision ResNet-50 at 224x224, 32 per GPU, NCCL::

      OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/step_time.py
      torchrun --nproc_per_node <gpus> bench/step_time.py

- ``accum`` (``step_time_accum.py``): ``--gas`` micro-batches a step, whole runs from step 0::

      OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/step_time.py --regime accum --smb --repeats 5

- ``capture`` (``step_time_capture.py``): the cost of capturing every statistic once (one process)::

      python bench/step_time.py --regime capture

- ``noise`` (``step_time_noise.py``): r between two disjoint batches against their size (one process)::

      python bench/step_time.py --regime noise

Each writes ``bench/results/<name>.json`` (see its module).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import driver  # noqa: E402
import torch  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command-line options; the defaults depend on whether CUDA is present."""
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50" if cuda else "resnet20", choices=["resnet20", "resnet50"])
    p.add_argument("--image_size", type=int, default=224 if cuda else 32)
    p.add_argument("--micro_batch", type=int, default=32, help="samples per rank per step")
    p.add_argument("--warmup", type=int, default=5, help="steps per engine excluded from the means")
    p.add_argument("--steps", type=int, default=150, help="measured steps of SGD and SP-NGD with staleness (>= 50)")
    p.add_argument("--steps_off", type=int, default=30, help="measured steps of SP-NGD without staleness")
    p.add_argument("--profile_steps", type=int, default=3, help="profiled SP-NGD steps (0: no profile)")
    p.add_argument(
        "--noise_sizes",
        type=int,
        nargs="*",
        default=[32, 64, 128, 256, 512, 896],
        help="global batch sizes of the statistic-noise diagnostic (none: skip)",
    )
    p.add_argument(
        "--regime",
        default="small",
        choices=["small", "accum", "capture", "noise"],
        help="small: 64 samples a step (gas 1); accum: --gas micro-batches a step, a whole run; "
        "capture: cost of capturing every statistic once (one process); "
        "noise: r against samples (one process)",
    )
    p.add_argument("--gas", type=int, default=16, help="accum: micro-batches per step (32 x 2 ranks x 16 = 1,024)")
    p.add_argument("--accum_steps", type=int, default=15, help="accum: steps of the run (15 = 10 digits epochs)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="accum: whole runs, each with fresh engines; the figure is the run of median ratio",
    )
    p.add_argument(
        "--smb",
        type=int,
        nargs="*",
        default=[1],
        help="accum: extra SP-NGD engines with these stat_micro_batches (none: only the default)",
    )
    p.add_argument(
        "--a_samples",
        type=int,
        default=None,
        help="every SP-NGD engine takes A from at most this many samples per micro-batch (default: all)",
    )
    p.add_argument(
        "--collective_times",
        action="store_true",
        help="accum: time every torch.distributed collective of each step (common.CollectiveCounter) "
        "and report the first blocking one (where a rank waits for the slower one) apart from the others",
    )
    p.add_argument(
        "--overlap_variant",
        action="store_true",
        help="accum: an extra SP-NGD engine with overlap_statistics: true (A sent behind the backward)",
    )
    p.add_argument(
        "--noise_in_small", action="store_true", help="small: also the sampling-noise table at --noise_sizes"
    )
    p.add_argument("--reps", type=int, default=3, help="capture: repetitions (best of)")
    p.add_argument("--r50_batch", type=int, default=2, help="capture: ResNet-50 224x224 batch (0: skip)")
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    if a.repeats < 1:
        p.error(f"--repeats must be an integer >= 1, got {a.repeats}")
    return a


def main() -> None:
    """Run the chosen regime; the distributed ones on every rank."""
    a = parse_args()
    common.prepare_environment()
    if a.regime == "capture":
        from step_time_capture import main_capture

        main_capture(a)
        return
    if a.regime == "noise":
        from step_time_noise import main_noise

        main_noise(a)
        return
    rank, world, device = driver.init_distributed()
    if a.regime == "accum":
        from step_time_accum import main_accum

        main_accum(a, rank, world, device)
    else:
        from step_time_small import main_small

        main_small(a, rank, world, device)
    driver.close_distributed()


if __name__ == "__main__":
    main()
    from spngd_ds.process_exit import exit_process

    exit_process(0)  # not the interpreter's teardown, which gloo's threads can abort
