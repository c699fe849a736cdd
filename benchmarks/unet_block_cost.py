"""Share of one U-Net call spent before the down blocks, in them, in the middle block and in the up path.

    python benchmarks/unet_block_cost.py                    # the shipped U-Net, batch 64, one thread

Tells what running the down path once for both halves of an injection step could save (README, Generation speed).
"""

import argparse
import time

import torch


from diffinject.core.diffusion import load_unet
from diffinject.core.run import CORPUS_UNET


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", default=str(CORPUS_UNET))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    unet = load_unet(args.unet).eval()
    size = unet.config.sample_size
    x = torch.randn(args.batch_size, unet.config.in_channels, size, size)
    marks = {}
    for name, module in (("down", unet.down_blocks[0]), ("mid", unet.mid_block), ("up", unet.up_blocks[0])):
        module.register_forward_pre_hook(lambda m, a, name=name: marks.__setitem__(name, time.perf_counter()))
    totals = dict.fromkeys(("time embedding and conv_in", "down blocks", "middle block", "up blocks and conv_out"), 0.0)
    with torch.inference_mode():
        unet(x, 500)  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            unet(x, 500)
            end = time.perf_counter()
            for key, (a, b) in zip(totals, ((start, marks["down"]), (marks["down"], marks["mid"]),
                                            (marks["mid"], marks["up"]), (marks["up"], end))):
                totals[key] += b - a
    whole = sum(totals.values())
    print(f"{args.unet}: batch {args.batch_size}, {args.threads} thread(s), {whole / args.repeats:.3f} s per call")
    for key, value in totals.items():
        print(f"  {key:28s} {100 * value / whole:5.1f} %")


if __name__ == "__main__":
    main()
