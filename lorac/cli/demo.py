"""`lorac demo`: the end-to-end LoRA demo on scikit-learn's 8x8 digits (see lorac.demo)."""

import time


def register(subparsers):
    parser = subparsers.add_parser(
        "demo", help="pretrain an MLP, fine-tune it fully and with LoRA, report and plot",
        description="Pretrain a 64-512-512-10 MLP on scikit-learn's bundled 8x8 digits, fine-tune it on "
                    "shifted digits fully and with LoRA at several ranks, and report accuracy, trainable "
                    "parameters, d90, checkpoint sizes, time per epoch and training memory. Needs the "
                    "'demo' extra: pip install 'lorac[demo]'.")
    parser.add_argument("--quick", action="store_true", help="fewer epochs (well under 30 s)")
    parser.add_argument("--similarity", action="store_true",
                        help="instead: the LoRA paper's subspace-similarity figure -- train r=8, r=64 and a second "
                             "r=64 seed, write heatmaps of phi(i, j) beside a random-Gaussian baseline "
                             "(about 30 s; --quick: one repetition, fewer epochs, under 10 s)")
    parser.add_argument("--inits", action="store_true",
                        help="instead: LoRA's initialisations side by side at one rank (kaiming, gaussian, "
                             "orthogonal, pissa, olora, mica, eva, corda ipm/kpm, lora_ga): test accuracy along "
                             "the same training (about 40 s; --quick: under 15 s)")
    parser.add_argument("--out", default="lorac-demo", metavar="DIR",
                        help="folder for checkpoints, summary.json/.txt and PNG plots (default: %(default)s)")
    parser.add_argument("--epochs", type=_positive_int, metavar="N",
                        help="fine-tuning epochs (default: 20, --quick: 8)")
    parser.add_argument("--pretrain-epochs", type=_positive_int, metavar="N",
                        help="pretraining epochs (default: 20, --quick: 8)")
    parser.add_argument("--ranks", type=_ranks, metavar="R,R,...",
                        help="LoRA ranks to compare (default: 1,2,4,8,16,64; with --similarity exactly two, "
                             "default 8,64; with --inits one, default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default: %(default)s)")
    parser.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                        help="OpenBLAS threads (default: %(default)s; the demo's matrices are small)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _positive_int(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _ranks(text):
    import argparse

    try:
        ranks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not ranks or min(ranks) < 1 or len(set(ranks)) != len(ranks):
        raise argparse.ArgumentTypeError(f"expected distinct positive ranks, got {text!r}")
    return tuple(sorted(ranks))


def run(args):
    from . import CommandError
    from ..demo import default_config, quick_config, run as run_demo
    from ..demo._deps import MissingDependency

    changes = {"seed": args.seed, "threads": args.threads, "progress": not args.no_progress,
               "plots": not args.no_plots}
    if args.epochs is not None:
        changes["finetune_epochs"] = args.epochs
    if args.pretrain_epochs is not None:
        changes["pretrain_epochs"] = args.pretrain_epochs
    if args.ranks is not None:
        changes["ranks"] = args.ranks
    if args.similarity and args.inits:
        raise CommandError("--similarity and --inits are two different runs: give one")
    if args.similarity or args.inits:
        return _run_variant(args, changes, "similarity" if args.similarity else "inits")
    config = (quick_config if args.quick else default_config)(**changes)
    start = time.perf_counter()
    try:
        results, text = run_demo(config, args.out)
    except MissingDependency as exc:
        raise CommandError(str(exc)) from None
    print()
    print(text)
    files = ["summary.txt", "summary.json"] + results.get("plots", [])
    print(f"\nwrote {', '.join(files)} and the checkpoints to {args.out}/ "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


# --similarity / --inits: (module, how many --ranks, the config field they set, the files it writes)
VARIANTS = {
    "similarity": ("similarity", 2, "similarity_ranks", "the adapters"),
    "inits": ("inits", 1, "inits_rank", None),
}


def _run_variant(args, changes, name):
    """`lorac demo --similarity` (lorac.demo.similarity) or `--inits` (lorac.demo.inits)."""
    import importlib

    from . import CommandError
    from ..demo import default_config, quick_config
    from ..demo._deps import MissingDependency

    module_name, count, field, extra_files = VARIANTS[name]
    ranks = changes.pop("ranks", None)
    if ranks is not None:
        if len(ranks) != count:
            wanted = "two ranks (small,large)" if count == 2 else "one rank"
            raise CommandError(f"--ranks with --{name} takes exactly {wanted}, got {','.join(map(str, ranks))}")
        changes[field] = ranks if count > 1 else ranks[0]
    config = (quick_config if args.quick else default_config)(**changes)
    start = time.perf_counter()
    try:
        results, text = importlib.import_module(f"lorac.demo.{module_name}").run(config, args.out)
    except MissingDependency as exc:
        raise CommandError(str(exc)) from None
    print()
    print(text)
    files = [f"{name}.txt", f"{name}.json"] + results.get("plots", [])
    also = f" and {extra_files}" if extra_files else ""
    print(f"\nwrote {', '.join(files)}{also} to {args.out}/ in {time.perf_counter() - start:.1f} s")
    return 0
