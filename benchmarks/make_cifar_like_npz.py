"""Write a reduced CIFAR-100-shaped .npz (random uint8 32x32x3 images, 100 classes) for
`dclang bench --epoch`, so that an end-to-end epoch of the CIFAR graphs can be timed without
downloading CIFAR and in minutes on a CPU.

    python benchmarks/make_cifar_like_npz.py /tmp/cifar_like.npz --train 1024 --test 256

The pixels are noise: the epoch's time does not depend on what the images show.
"""

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=1024, help="training images (val is carved from them)")
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    def labels(n: int) -> np.ndarray:
        y = rng.integers(0, args.classes, n)
        y[: min(n, args.classes)] = np.arange(min(n, args.classes))  # every class present: 100 classes read back
        return y

    np.savez(args.out,
             x_train=rng.integers(0, 256, (args.train, 32, 32, 3), dtype=np.uint8), y_train=labels(args.train),
             x_test=rng.integers(0, 256, (args.test, 32, 32, 3), dtype=np.uint8), y_test=labels(args.test))


if __name__ == "__main__":
    main()
