"""Command line: ``fcl-bench run | list | scenario | pretrain | report``."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from fcl_bench import config as C
from fcl_bench.paths import click_path


class UserError(click.ClickException):
    """Printed as ``Error: ...`` without a traceback; exit status 2, like click's own usage errors."""

    exit_code = 2


def _user_errors():
    from fcl_bench.datasets import DatasetError
    from fcl_bench.executor import PlanError
    from fcl_bench.nn.foundation import FoundationError
    from fcl_bench.nn.small import SmallModelError
    from fcl_bench.paths import PathError
    from fcl_bench.registry import RegistryError
    from fcl_bench.scenario import ScenarioError
    from fcl_bench.suites import SuiteError
    from fcl_bench.weights import ShippedWeightsError

    return (C.ConfigError, RegistryError, DatasetError, ScenarioError, FoundationError, PlanError, PathError,
            SuiteError, SmallModelError, ShippedWeightsError)


MAX_SEED = 2**32 - 1


def _os_error(e: OSError) -> str:
    name = e.filename if e.filename is not None else ""
    shown = (name[:60] + "...") if isinstance(name, str) and len(name) > 60 else name
    return f"{shown}: {e.strerror or e}; check the path"


def _parse_seeds(text: str | None, default: list[int]) -> list[int]:
    """``--seeds 42,1999`` -> [42, 1999] (``default`` when None); empty items, non-integers, negatives and huge
    values are errors."""
    if text is None:
        return list(default)
    items = [s.strip() for s in text.split(",")]
    if not any(items):
        raise C.ConfigError(f"--seeds {text!r} names no seed; give comma-separated integers, e.g. --seeds 42,1999")
    out = []
    for s in items:
        if not s:
            continue
        try:
            v = int(s)
        except ValueError:
            raise C.ConfigError(f"--seeds must be comma-separated integers, got {s!r} in {text!r}") from None
        if not 0 <= v <= MAX_SEED:
            raise C.ConfigError(f"--seeds: {v} is out of range; seeds are integers in 0..{MAX_SEED}")
        out.append(v)
    return list(dict.fromkeys(out))


def _parse_methods(text: str, available: list[str]) -> list[str]:
    if text.strip() == "all":
        return available
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise C.ConfigError(f"--methods {text!r} names no method; give comma-separated names or 'all' "
                            f"(available: {', '.join(available)})")
    return list(dict.fromkeys(names))


def _build_run_config(preset: str, run_over: dict[str, str], **cli) -> C.RunConfig:
    cfg = C.preset(preset)
    direct = {k: str(v) for k, v in cli.items() if v is not None}
    cfg = C.apply_overrides(cfg, {**direct, **run_over}, "run")
    return cfg


@dataclass
class Planned:
    method: str
    label: str
    overrides: dict[str, str]
    run_overrides: dict[str, str] = field(default_factory=dict)


def _method_config(cls, overrides: dict[str, str]):
    return C.apply_overrides(cls.Config(), overrides, cls.name)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fcl-bench")
def main() -> None:
    """fcl-bench: Fed-LSCL and its baselines under one federated continual learning protocol."""


_common = [
    click.option("--preset", default="quick", show_default=True, help="protocol preset (fcl-bench list presets)"),
    click.option("--dataset", default=None, help="dataset name (fcl-bench list datasets)"),
    click.option("--data-root", default=None, help="folder holding the dataset files"),
    click.option("--download/--no-download", default=None, help="download a torchvision dataset if missing"),
    click.option("--foundation", default=None, help="'tiny' or a timm ViT name with tag"),
    click.option("--foundation-weights", default=None, help="weights file (safetensors or torch state dict)"),
    click.option("-o", "--override", "overrides", multiple=True,
                 help="KEY=VALUE (run config) or METHOD.KEY=VALUE (method config); repeatable"),
]


def common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@main.command()
@click.option("--methods", default="all", show_default=True, help="comma-separated method names, or 'all'")
@common
@click.option("--seeds", default=None, help="comma-separated seeds (default: the preset's seeds; standard: 42,1999,2024, "
                                         "others: their seed)")
@click.option("--out", default="results", show_default=True, type=click_path(file_okay=False))
@click.option("--suite", "suite", default=None,
              help="run a suite (a name from `fcl-bench list suites` or a JSON file) instead of --methods")
@click.option("--device", default=None, help="auto, cpu or cuda[:N]")
@click.option("--plugin", "plugins", multiple=True, type=click_path(dir_okay=False),
              help="a Python file defining Method subclasses; repeatable")
@click.option("--flops", default="sampled", show_default=True, type=click.Choice(["sampled", "all", "off"]),
              help="FLOP counting: each distinct step counted once per party and reused (sampled), "
                   "every op (all), or none")
@click.option("--threads", type=click.IntRange(min=1, max=1024), default=None,
              help="CPU threads for torch (default: torch's choice; 1 avoids oversubscription on a busy machine)")
@click.option("--force", is_flag=True, help="re-run runs that already completed")
@click.option("--keep-checkpoints", is_flag=True,
              help="keep each run's task-boundary checkpoint (all clients' and the server's state) when it completes")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--executor", default="in-process", show_default=True,
              type=click.Choice(["in-process", "ray", "flower-sim", "flower"]),
              help="where runs execute: one after another in this process; as Ray tasks (needs fcl-bench[ray]); "
                   "or with the clients on Flower's simulation runtime or a Flower federation (--superlink; "
                   "needs fcl-bench[flower])")
@click.option("--ray-address", default=None,
              help="with --executor ray: a running cluster ('auto' or HOST:PORT); default: start a local Ray "
                   "with this machine's CPUs")
@click.option("--cpus-per-run", type=click.IntRange(min=1), default=None,
              help="with --executor ray: CPUs each run asks for (default 1); also its torch threads unless --threads")
@click.option("--gpus-per-run", type=click.FloatRange(min=0), default=None,
              help="with --executor ray: GPUs each run asks for (default 0); a fraction shares a card")
@click.option("--superlink", default="", help="--executor flower: the SuperLink's HOST:PORT")
@click.option("--root-certificates", default=None, type=click_path(dir_okay=False),
              help="--executor flower: CA certificate of the SuperLink's TLS (without it: loopback only)")
@click.option("--flower-timeout", default=None, type=click.FloatRange(min=1),
              help="Flower: seconds a client may take to answer one message before the run fails (600)")
def run(methods, preset, dataset, data_root, download, foundation, foundation_weights, overrides, seeds, out,
        suite, device, plugins, flops, threads, force, keep_checkpoints, quiet, executor, ray_address,
        cpus_per_run, gpus_per_run, superlink, root_certificates, flower_timeout):
    """Run methods (or a suite) on a preset; results go to OUT/SUITE/LABEL/DATASET/seedK/, where SUITE is the
    suite's name or, for plain runs, the preset's."""
    from fcl_bench import registry
    from fcl_bench.paths import check_writable_dir

    runner = _executor(executor, ray_address, cpus_per_run, gpus_per_run, threads, quiet)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        check_writable_dir(out, "--out")
        for p in plugins:
            registry.load_plugin_file(p)
        run_over, meth_over = C.split_overrides(overrides)
        names = _parse_methods(methods, registry.available_methods()) if suite is None else []
        classes = {n: registry.get_method(n) for n in names}
        for m in meth_over:
            if suite is None and m not in classes:
                raise C.ConfigError(f"override for '{m}', which is not among the methods run ({', '.join(names)})")
        base = _build_run_config(preset, run_over, dataset=dataset, data_root=data_root, download=download,
                                 foundation=foundation, foundation_weights=foundation_weights, device=device)
        # an explicit -o seed= wins over the preset's default seeds
        seed_list = _parse_seeds(seeds, [base.seed] if "seed" in run_over else C.preset_seeds(preset))
        if suite is not None:
            from fcl_bench.suites import load_suite

            st = load_suite(suite)
            avail = registry.available_methods()
            entries = st.plan(avail, {n: registry.get_method(n).Config for n in avail})
            classes = {e["method"]: registry.get_method(e["method"]) for e in entries}
            plan = [Planned(e["method"], e["label"], {**e["overrides"], **meth_over.get(e["method"], {})},
                            e["run_overrides"]) for e in entries]
            results_name = st.name
        else:
            plan = [Planned(n, n, meth_over.get(n, {})) for n in names]
            results_name = preset
        for p in plan:  # every method config is validated before any data is loaded
            _method_config(classes[p.method], p.overrides)
        specs = _specs(plan, base, seed_list, out, results_name, force=force, flops=flops, quiet=quiet,
                       keep_checkpoints=keep_checkpoints, plugins=tuple(plugins),
                       executor="in-process" if executor == "ray" else executor,
                       superlink=superlink, root_certificates=root_certificates, flower_timeout=flower_timeout)
        if executor == "flower":
            from fcl_bench.flower.deploy import check_insecure

            check_insecure(superlink or "?", root_certificates)
        from fcl_bench.executor import preflight

        preflight(specs)  # what would fail every run the same way is reported once, before anything runs
    except _user_errors() as e:
        raise UserError(str(e)) from None
    except ValueError as e:
        raise UserError(str(e)) from None
    except OSError as e:  # a path the system refuses (a name too long, a loop of links)
        raise UserError(_os_error(e)) from None
    if not execute(specs, runner):
        sys.exit(1)


def _executor(name, ray_address, cpus_per_run, gpus_per_run, threads, quiet):
    """The executor's function (None: in-process); Ray's options are checked, and Ray imported, up front."""
    ray_opts = {"--ray-address": ray_address, "--cpus-per-run": cpus_per_run, "--gpus-per-run": gpus_per_run}
    if name != "ray":
        given = [k for k, v in ray_opts.items() if v is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply with --executor ray")
        return None
    from fcl_bench.ray_executor import RayUnavailable, import_ray, run_on_ray

    if gpus_per_run is not None and gpus_per_run > 1 and gpus_per_run != int(gpus_per_run):
        raise UserError(f"--gpus-per-run {gpus_per_run:g}: more than one GPU must be a whole number")
    try:
        import_ray()
    except RayUnavailable as e:
        raise UserError(str(e)) from None

    def run_ray(specs, echo, err, user_errors):
        try:
            return run_on_ray(specs, echo, err, user_errors, address=ray_address, cpus_per_run=cpus_per_run or 1,
                              gpus_per_run=gpus_per_run or 0, threads=threads, progress=not quiet)
        except RayUnavailable as e:
            raise UserError(str(e)) from None

    return run_ray


def _specs(plan: list[Planned], base: C.RunConfig, seeds: list[int], out: str, suite: str, **common):
    """The plan as executor specs: every planned run for every seed (seeds outermost)."""
    import dataclasses

    from fcl_bench.executor import RunSpec

    return [RunSpec(method=p.method, label=p.label, out=str(out), suite=suite, method_overrides=dict(p.overrides),
                    run=dataclasses.replace(C.apply_overrides(base, p.run_overrides, "run"), seed=seed),
                    command=" ".join(sys.argv), **common)
            for seed in seeds for p in plan]


def execute(specs, runner=None) -> bool:
    """Run every spec (in this process unless ``runner``, an executor function); a failed run is recorded
    and the rest go on."""
    from fcl_bench.executor import run_in_process

    runner = runner or run_in_process
    try:
        summary = runner(specs, click.echo, lambda line: click.echo(line, err=True), _user_errors())
    except _user_errors() as e:  # bad data or protocol: every run would fail the same way
        raise UserError(str(e)) from None
    _print_summary(summary)
    failed = [s for s in summary if s["state"] not in ("completed", "skipped")]
    if failed:
        click.echo(f"{len(failed)} of {len(summary)} runs failed: " +
                   "; ".join(f"{s['method']} seed {s['seed']}: {s['reason']}" for s in failed), err=True)
    return not failed


def _print_summary(rows: list[dict]) -> None:
    if not rows:
        return
    click.echo("\n{:<22} {:>6} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>8}".format(
        "method", "seed", "state", "final_acc", "avg_inc", "forgetting", "MB up", "MB down", "seconds"))
    for r in rows:
        if r["state"] == "completed":
            click.echo("{:<22} {:>6} {:>10} {:>9.4f} {:>9.4f} {:>10.4f} {:>9.3f} {:>9.3f} {:>8.1f}".format(
                r["method"], r["seed"], r["state"], r["final_acc"], r["avg_inc"], r["forgetting"], r["mb_up"],
                r["mb_down"], r["seconds"]))
        else:
            click.echo(f"{r['method']:<22} {r['seed']:>6} {str(r['state']):>10}  {r['reason']}")


@main.command("list")
@click.argument("what", required=False, type=click.Choice(["methods", "datasets", "presets", "suites"]))
@click.option("--plugin", "plugins", multiple=True, type=click_path(dir_okay=False))
def list_(what, plugins):
    """List methods, datasets, presets and suites."""
    from fcl_bench import registry
    from fcl_bench.datasets import DATASETS

    try:
        for p in plugins:
            registry.load_plugin_file(p)
    except _user_errors() as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(_os_error(e)) from None
    if what in (None, "methods"):
        click.echo("methods:")
        for n in registry.available_methods():
            cls = registry.get_method(n)
            keys = ", ".join(cls.config_fields())
            click.echo(f"  {n:<14} {cls.description}")
            click.echo(f"  {'':<14} options: {keys}")
    if what in (None, "datasets"):
        click.echo("datasets:")
        for n, e in sorted(DATASETS.items()):
            click.echo(f"  {n:<14} {e.description}")
    if what in (None, "presets"):
        click.echo("presets:")
        for n in C.PRESETS:
            click.echo(f"  {n:<18} {C.PRESET_HELP.get(n, '')}")
    if what in (None, "suites"):
        from fcl_bench.suites import available_suites, load_suite

        click.echo("suites:")
        for n in available_suites():
            click.echo(f"  {n:<14} {load_suite(n).description}")


@main.command()
@common
@click.option("--seed", type=int, default=None)
@click.option("--json", "json_path", default=None, type=click_path(dir_okay=False), help="write the scenario JSON")
def scenario(preset, dataset, data_root, download, foundation, foundation_weights, overrides, seed, json_path):
    """Print the per-client scenario table of a preset (and write its JSON)."""
    from fcl_bench.datasets import check_dataset
    from fcl_bench.paths import check_writable_dir
    from fcl_bench.scenario import scenario_table
    from fcl_bench.workspace import load_data, make_scenario

    try:
        run_over, meth_over = C.split_overrides(overrides)
        if meth_over:
            raise C.ConfigError(f"scenario takes run overrides only; {', '.join(meth_over)} override(s) "
                                "configure methods (use them with `fcl-bench run`)")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise C.ConfigError(f"--seed {seed} is out of range; seeds are integers in 0..{MAX_SEED}")
        if json_path is not None:
            check_writable_dir(Path(json_path).parent if str(json_path).strip() else "", "--json")
            if Path(json_path).is_dir():
                raise C.ConfigError(f"--json {json_path} is a folder; give a file name, e.g. scenario.json")
        cfg = _build_run_config(preset, run_over, dataset=dataset, data_root=data_root, download=download,
                                foundation=foundation, foundation_weights=foundation_weights, seed=seed)
        check_dataset(cfg.dataset, cfg.data_root, cfg.download)
        _, ds = load_data(cfg.workspace())
        sc = make_scenario(cfg.workspace(), ds)
    except _user_errors() as e:
        raise UserError(str(e)) from None
    except ValueError as e:
        raise UserError(str(e)) from None
    except OSError as e:  # a path the system refuses (a name too long, a loop of links)
        raise UserError(_os_error(e)) from None
    click.echo(scenario_table(sc, ds.classes))
    if json_path:
        sc.save(json_path)
        click.echo(f"wrote {json_path} (hash {sc.short_hash})")


@main.command()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True,
              help="pretrain again even over shipped or cached weights (the result goes to the cache)")
@click.option("--small-models", default=None, metavar="ARCHS",
              help="comma-separated timm CNNs to pretrain as well; 'none' for none  [default: the CNNs of the "
                   "offline presets that start pretrained]")
@click.option("--write-shipped", is_flag=True,
              help="for maintainers: also write the new weights into the package's fcl_bench/weights/ and its "
                   "manifest (needs --force)")
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True)
def pretrain(seed, force, small_models, write_shipped, device, quiet):
    """Pretrain the offline models on the synthetic pretraining classes: the tiny foundation ViT and the
    client CNNs of the offline presets. Shipped or cached weights are loaded instead unless --force; each
    result says whether it matches the shipped file bit for bit."""
    from fcl_bench.data import Preprocess
    from fcl_bench.datasets import load_dataset
    from fcl_bench.nn import pretrain as P
    from fcl_bench.nn.tiny_vit import TINY_VIT_CONFIG
    from fcl_bench.workspace import resolve_device

    try:
        if not 0 <= seed <= MAX_SEED:
            raise C.ConfigError(f"--seed {seed} is out of range; seeds are integers in 0..{MAX_SEED}")
        if write_shipped and not force:
            raise C.ConfigError("--write-shipped writes freshly pretrained weights into the package; add --force")
        archs = C.offline_pretrained_archs() if small_models is None else [
            a.strip() for a in small_models.split(",") if a.strip() and a.strip().lower() != "none"]
        dev = resolve_device(device)
    except (C.ConfigError, ValueError) as e:
        raise UserError(str(e)) from None
    ds = load_dataset("synthetic")
    try:
        results = [("tiny ViT", "tiny_vit", *P.pretrain_tiny_vit(ds, seed=seed, force=force, progress=not quiet,
                                                                  device=dev))]
        for arch in archs:
            results.append((arch, arch, *P.pretrain_small_model(arch, ds, Preprocess(**TINY_VIT_CONFIG), seed=seed,
                                                                force=force, progress=not quiet, device=dev)))
    except _user_errors() as e:
        raise UserError(str(e)) from None
    for what, name, model, report in results:
        _say_pretrained(what, name, model, report, write_shipped)


def _say_pretrained(what: str, name: str, model, report: dict, write_shipped: bool) -> None:
    """What ``fcl-bench pretrain`` prints about one model (and, with ``--write-shipped``, ships it)."""
    from fcl_bench import weights as W
    from fcl_bench.nn.pretrain import weights_bytes

    click.echo(f"{what}: {report.get('origin', 'trained')}")
    for k in ("probe_acc_pretrained", "probe_acc_random_init", "pretrain_test_accuracy", "train_seconds",
              "images_per_second", "epochs", "weights_sha256"):
        if report.get(k) is not None:
            click.echo(f"  {k}: {report[k]}")
    if "key" not in report:
        return
    if report.get("origin") == "shipped":
        click.echo("  the shipped file (its sha256 checked); --force pretrains it again and compares")
    else:
        click.echo(f"  {W.compare_to_shipped(report['key'], report.get('weights_sha256'))}")
    if write_shipped:
        shipped = {k: v for k, v in report.items() if k != "origin"}
        path = W.write_shipped(report["key"], name, weights_bytes(model, report["key"]), shipped)
        click.echo(f"  wrote {path}")


def _attach_report() -> None:
    from fcl_bench.report import report_command

    main.add_command(report_command, "report")


_attach_report()



@main.group()
def flower():
    """A local Flower federation (SuperLink + SuperNodes on 127.0.0.1); needs fcl-bench[flower]."""


@flower.command("up")
@click.option("--clients", type=click.IntRange(min=1), required=True, help="SuperNodes to start (one per client)")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=9093, show_default=True,
              help="the SuperLink's port on 127.0.0.1")
def flower_up(clients, port):
    """Start a SuperLink and CLIENTS SuperNodes on 127.0.0.1, each told its client id; run plans through it
    with `fcl-bench run --executor flower --superlink 127.0.0.1:PORT ...`; Ctrl-C stops everything."""
    import signal
    import time

    from fcl_bench.flower.deploy import LocalFederation

    fed = LocalFederation(clients, port=port)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        fed.start()
        click.echo(f"Flower federation up: SuperLink {fed.address}, {clients} SuperNodes (logs in {fed.home})")
        click.echo(f"  fcl-bench run --executor flower --superlink {fed.address} --methods ... ", nl=True)
        click.echo("Ctrl-C stops it.")
        while all(p.poll() is None for p in fed.procs.values()):
            time.sleep(0.5)
        dead = [n for n, p in fed.procs.items() if p.poll() is not None]
        click.echo(f"{', '.join(dead)} exited; stopping the federation", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("stopping the federation")
    finally:
        fed.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
