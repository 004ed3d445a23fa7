"""The ``edgeship`` command line: parse, build options, call the library, print.

Expected failures (any ``EdgeshipError``) print one ``error: ...`` line to stderr and exit 1;
usage mistakes exit 2 (argparse). Heavy libraries are imported only by the subcommands that
need them, so ``edgeship bundle verify`` works on a machine without torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sdk.cli.fleet import add_parsers as add_fleet_parsers
from sdk.cli.keys import add_passphrase_argument, load_signers, new_key_passphrase
from sdk.cli.package_args import add_input_arguments, input_options, per_target_targets
from sdk.cli.quant_flags import add_quantization_arguments, quantization_options
from sdk.cli.root import add_parser as add_root_parser
from sdk.cli.tables import human_size
from sdk.cli.tables import print_table as _print_table
from sdk.errors import EdgeshipError, InputError

__all__ = ["build_parser", "main"]


class _Progress:
    """Prints one line per step with the time since the command started (to stderr)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# ---- keys --------------------------------------------------------------------------------------
def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from sdk.signing import generate_keypair, key_id, load_public_key

    passphrase = new_key_passphrase(args.passphrase_file)
    private_path, public_path = generate_keypair(args.out, args.name, passphrase=passphrase)
    how = "encrypted with the passphrase" if passphrase else "unencrypted"
    print(f"private key: {private_path} (mode 0600, {how}, keep it secret)")
    print(f"public key:  {public_path} (give this to devices with --trust)")
    print(f"key id:      {key_id(load_public_key(public_path))}")
    return 0


# ---- package -----------------------------------------------------------------------------------
def _cmd_package(args: argparse.Namespace) -> int:
    from packagers import PackageOptions, package

    progress = _Progress(args.quiet)
    _package_defaults(args)
    expires = None
    if args.expires_days is not None:
        expires = datetime.now(timezone.utc) + timedelta(days=args.expires_days)
    labels = None
    if args.labels:
        import numpy as np

        try:
            labels = np.load(args.labels, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read labels {args.labels}: {e}") from e
    if args.target_default or args.precision_default:
        progress(f"building {args.target} {' '.join(args.precision)} (the default; choose with --target and "
                 "--precision)")  # fmt: skip
    signers = load_signers([args.key], args.passphrase_file)
    results = package(
        args.model,
        name=args.name,
        version=args.version,
        key=signers,
        out_dir=args.out,
        target=_split_list(args.target),
        precision=args.precision,
        calibration=args.calibration,
        options=PackageOptions(
            calibration_method=args.calibration_method,
            for_runtime=args.for_runtime,
            device=args.device,
            validate_on=args.validate_on,
            **input_options(args),
            **quantization_options(args),
        ),
        labels=labels,
        task=args.task,
        accept_drift=args.accept_drift,
        label=args.label,
        expires=expires,
        progress=progress,
    )
    headers, rows = package_table(results)
    _print_table(headers, rows)
    if any(row[-1].endswith("data)") for row in rows):
        print("note: validated on generated data, not yours: it shows the bundle matches the model on made-up "
              "inputs; pass --calibration with real inputs")  # fmt: skip
    return 0


def package_table(results: Sequence[Any]) -> tuple[list[str], list[list[str]]]:
    """The table `edgeship package` prints: one row per bundle, with task accuracy when labels were given."""
    from packagers import is_generated

    accuracies = [r.validation.get("accuracy") or {} for r in results]
    with_accuracy = any("bundle" in a for a in accuracies)
    headers = ["bundle", "target", "precision", "size", "p50 ms", "min cosine"]
    headers += ["accuracy"] if with_accuracy else []
    rows = []
    for r, accuracy in zip(results, accuracies, strict=True):
        worst = min((m.get("cosine_min", m.get("cosine", 1.0)) for m in r.validation.get("metrics", {}).values()),
                    default=float("nan"))  # fmt: skip
        ran = (r.validation.get("numeric") or {}).get("ran", True)
        row = [
            r.bundle_path.name, r.target, r.precision, human_size(r.size_bytes),
            f"{r.latency_ms.get('p50', float('nan')):.3f}" if ran else "-", f"{worst:.5f}" if ran else "-",
        ]  # fmt: skip
        if with_accuracy:
            row.append(_accuracy_cell(accuracy))
        status = "pass" if r.validation.get("passed") else "DRIFT (accepted)"
        if is_generated(r.validation.get("data")):  # made-up inputs: say so where the verdict is
            status += " (random calibration)" if r.precision == "int8" else " (generated data)"
        rows.append([*row, status if ran else f"{status} (structure only)"])
    return [*headers, "validation"], rows


def _accuracy_cell(accuracy: dict[str, Any]) -> str:
    if accuracy.get("bundle") is None:
        return "-"
    return f"{accuracy['bundle']:.4f} (original {accuracy['reference']:.4f})"


# ---- bundle inspect / verify -------------------------------------------------------------------
def _cmd_inspect(args: argparse.Namespace) -> int:
    from sdk.bundle import inspect_bundle

    manifest, signatures = inspect_bundle(args.file)
    if args.json:
        print(json.dumps({"manifest": manifest.to_dict(), "signatures": signatures}, indent=2, sort_keys=True))
        return 0
    print("UNVERIFIED: inspect shows what the bundle claims; use `edgeship bundle verify` to check it.")
    label = f" ({manifest.label})" if manifest.label else ""
    print(f"name:       {manifest.name}  version {manifest.version}{label}")
    print(f"target:     {manifest.target}  precision {manifest.precision}  task {manifest.task or '-'}")
    print(f"runtime:    {json.dumps(dict(manifest.runtime), sort_keys=True)}")
    print(f"created:    {manifest.created}  expires {manifest.expires or 'never'}")
    for side, specs in (("inputs", manifest.inputs), ("outputs", manifest.outputs)):
        print(f"{side + ':':<11} " + ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in specs))
    v = manifest.validation
    if v:
        verdict = f"{'passed' if v.get('passed') else 'FAILED'}{' (drift accepted)' if v.get('accepted_drift') else ''}"
        numeric = v.get("numeric")
        if isinstance(numeric, dict) and not numeric.get("ran", True):  # e.g. Core ML on Linux: nothing was run
            structure = v.get("structure") or {}
            print(f"validation: structural check only, {verdict}: numeric validation did not run "
                  f"({numeric.get('reason')})")  # fmt: skip
            if structure.get("problems"):
                print(f"  problems: {structure['problems']}")
        else:
            from packagers import is_generated

            data = f" of generated data ({v.get('data')}), not yours" if is_generated(v.get("data")) else ""
            print(f"validation: {verdict} against {v.get('reference')} on {v.get('samples')} samples{data}")
            for out, metrics in sorted((v.get("metrics") or {}).items()):
                print(f"  {out}: " + ", ".join(f"{k}={val:.6g}" if isinstance(val, float) else f"{k}={val}"
                                                for k, val in sorted(metrics.items())))  # fmt: skip
            accuracy = v.get("accuracy") or {}
            if accuracy.get("bundle") is not None:
                print(f"  accuracy: {accuracy['bundle']:.4f} (original {accuracy['reference']:.4f}) on the labelled "
                      f"samples, scored on {accuracy.get('output')}")  # fmt: skip
    total = sum(f.size for f in manifest.files)
    print(f"files:      {len(manifest.files)}, {human_size(total)} ({total} bytes)")
    for f in manifest.files:
        print(f"  {human_size(f.size):>10}  {f.sha256[:16]}  {f.path}")
    print("signatures: " + ", ".join(s.get("keyid", "?")[:16] for s in signatures))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from sdk.bundle import read_bundle
    from sdk.trustfiles import load_trust

    trust = load_trust(args.trust, args.threshold)
    scratch = Path(tempfile.mkdtemp(prefix="edgeship-verify-"))
    try:
        vb = read_bundle(
            args.file,
            trust,
            scratch / "bundle",
            installed_version=args.installed_version,
            allow_downgrade=args.allow_downgrade,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    m = vb.manifest
    print(
        f"OK {m.name} v{m.version} {m.target}/{m.precision}: {len(vb.keyids)} of {trust.threshold} required "
        f"signature(s) valid ({', '.join(k[:12] for k in vb.keyids)}), {len(m.files)} files checked, "
        f"sha256 {vb.sha256}"
    )
    return 0


# ---- predict -----------------------------------------------------------------------------------
def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from device_runtime import load
    from device_runtime.results import answer
    from sdk.trustfiles import load_trust

    with load(args.file, load_trust(args.trust)) as model:
        result, outputs = answer(model, args)
    if args.out:
        if outputs is None:
            raise InputError("--out saves output arrays: it goes with --input, not --text or --image")
        np.savez(args.out, **outputs)  # type: ignore[arg-type]  # numpy stubs take **kwds as allow_pickle
    print(json.dumps(result, indent=2, allow_nan=False))
    return 0


# ---- targets / demo ----------------------------------------------------------------------------
def _cmd_targets(args: argparse.Namespace) -> int:
    from packagers import capability_table

    _print_table(*capability_table())
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    from sdk.profiles import load_profiles, profile_table

    if args.json:
        print(json.dumps({name: p.to_dict() for name, p in load_profiles().items()}, indent=2))
        return 0
    _print_table(*profile_table())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sdk.cli.demo import DemoOptions, run_demo, run_full_demo

    if args.quick:
        run_demo(Path(args.out), progress=_Progress(args.quiet))
        return 0
    options = DemoOptions(
        out_dir=Path(args.out),
        targets=tuple(_split_list(args.targets)),
        embedded_broker=args.embedded_broker,
        keep_running=args.keep_running,
    )
    run_full_demo(options, say=_Progress(args.quiet))
    return 0


def _cmd_broker(args: argparse.Namespace) -> int:
    from fleet.broker import run_broker

    def ready() -> None:
        print(f"embedded MQTT broker on {args.host}:{args.port} (Ctrl-C stops it; production: Mosquitto)", flush=True)

    run_broker(args.host, args.port, on_ready=ready)
    return 0


# ---- parser ------------------------------------------------------------------------------------
_DEFAULT_TARGET, _DEFAULT_PRECISION = "onnxruntime", "fp32"


def _add_package_parser(sub: Any) -> None:
    """`edgeship package`'s arguments; every list of choices comes from the packagers' registry, so `--help`
    cannot drift from what `package` accepts."""
    from packagers import CALIBRATION_FORMATS, CALIBRATION_METHODS, MODEL_PATHS, TASKS, available_targets, capabilities

    targets = available_targets()
    precisions = "; ".join(f"{t.value}: {', '.join(p.value for p in capabilities(t).precisions)}" for t in targets)
    pk = sub.add_parser(
        "package",
        help="build, validate, benchmark and sign bundles from a model",
        description="Build, validate, benchmark and sign bundles from a model.",
    )
    pk.add_argument("model", help="the model: " + "; ".join(MODEL_PATHS.values()))
    pk.add_argument(
        "--target",
        help=f"comma-separated targets: {', '.join(t.value for t in targets)} (default: {_DEFAULT_TARGET}; "
        "`edgeship targets` shows what each builds)",
    )
    pk.add_argument(
        "--precision",
        action="append",
        help=f"comma-separated precisions for every target (default: {_DEFAULT_PRECISION}), or per target, "
        "repeatable: --precision onnxruntime=fp32,int8-dynamic --precision openvino=int8; all-int8: every int8 "
        f"precision each target supports. By target: {precisions}",
    )
    pk.add_argument(
        "--for",
        dest="for_runtime",
        metavar="RUNTIME",
        help="build for this runtime release, e.g. onnxruntime==1.17, openvino==2026.4, coreml==iOS17: picks an "
        "export opset it runs and refuses what it cannot run (default --target: its target)",
    )
    pk.add_argument(
        "--device",
        metavar="NAME",
        help="build for a device profile (`edgeship devices` lists them), with the runtime releases it has "
        "(default --target: its first runtime)",
    )
    pk.add_argument(
        "--validate-on",
        metavar="PKG==VER",
        help="also validate in this exact runtime release (onnxruntime==1.17.3, ai-edge-litert==1.4.0, "
        "openvino==2024.0.0), in a cached virtual environment ($EDGESHIP_RUNTIME_ENVS); the numbers go into the "
        "manifest's validation.on_runtime",
    )
    pk.add_argument("--calibration", help="validation/calibration data: " + "; ".join(CALIBRATION_FORMATS))
    pk.add_argument("--labels", help=".npy of integer labels for the calibration samples (reports accuracy)")
    pk.add_argument(
        "--calibration-method",
        default=None,
        choices=CALIBRATION_METHODS,
        help="static int8 calibration (default: minmax; graphs that are not transformers also get a percentile "
        "candidate, and validation picks)",
    )
    add_quantization_arguments(pk)
    pk.add_argument(
        "--task",
        choices=TASKS,
        metavar="TASK",
        help="the task of a transformers folder (default: from its config's architecture): " + ", ".join(TASKS),
    )
    pk.add_argument("--key", required=True, help="Ed25519 private key file (mode 0600)")
    add_passphrase_argument(pk, "the passphrase of an encrypted --key")
    pk.add_argument("--name", required=True, help="bundle name")
    pk.add_argument("--version", required=True, type=int, help="monotonic integer version")
    pk.add_argument("--label", help="human version label, e.g. 2026.11-rc1")
    pk.add_argument("--expires-days", type=float, help="bundle expires this many days from now")
    pk.add_argument("--out", required=True, help="output folder")
    pk.add_argument("--accept-drift", action="store_true", help="sign even if validation fails (recorded)")
    add_input_arguments(pk)
    pk.set_defaults(func=_cmd_package)


def _package_defaults(args: argparse.Namespace) -> None:
    """Fill `package`'s unset --target / --precision with the defaults, remembering which were unset."""
    if args.target is None and args.precision:
        args.target = per_target_targets(args.precision)  # --precision openvino=int8 alone: that target
    args.target_default, args.precision_default = args.target is None, args.precision is None
    if args.target is None and (args.for_runtime or args.device):
        from sdk.profiles import get_profile, parse_runtime_spec

        if args.for_runtime:
            args.target = parse_runtime_spec(args.for_runtime).target
        else:
            args.target = next(iter(get_profile(args.device).runtimes))
    args.target = args.target or _DEFAULT_TARGET
    args.precision = args.precision or [_DEFAULT_PRECISION]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeship", description="Package, sign, verify and run edge model bundles.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    sub = p.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="keys_command", required=True)
    gen = keys.add_parser("generate", help="create an Ed25519 key pair (NAME.key 0600, NAME.pub)")
    gen.add_argument("--out", required=True, help="folder for the key files")
    gen.add_argument("--name", default="edgeship", help="file name stem (default: edgeship)")
    add_passphrase_argument(gen, "encrypt NAME.key with this passphrase (PKCS#8)")
    gen.set_defaults(func=_cmd_keys_generate)
    add_root_parser(keys)

    _add_package_parser(sub)

    bundle = sub.add_parser("bundle", help="inspect or verify a bundle").add_subparsers(
        dest="bundle_command", required=True
    )
    ins = bundle.add_parser("inspect", help="show a bundle's manifest (unverified)")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true", help="print the manifest and signatures as JSON")
    ins.set_defaults(func=_cmd_inspect)
    ver = bundle.add_parser("verify", help="check signatures, expiry, version and every file's hash")
    ver.add_argument("file")
    ver.add_argument("--trust", action="append", required=True,
                     help="trusted public key file (repeatable), or one signed trust root (root.json)")  # fmt: skip
    ver.add_argument("--threshold", type=int, help="signatures required with key files (default 1; a root sets it)")
    ver.add_argument("--installed-version", type=int, help="refuse a bundle older than this version")
    ver.add_argument("--allow-downgrade", action="store_true", help="accept a version below --installed-version")
    ver.set_defaults(func=_cmd_verify)

    from device_runtime.results import add_request_arguments

    pr = sub.add_parser(
        "predict",
        help="verify a bundle, run one prediction and print the outputs",
        description="Verify a bundle, run it once and print the answer as JSON (as `edgeship-device predict` does).",
    )
    pr.add_argument("file")
    pr.add_argument("--trust", action="append", required=True,
                    help="trusted public key file (repeatable), or one signed trust root (root.json)")  # fmt: skip
    add_request_arguments(pr)
    pr.add_argument("--out", help="also save the output arrays to this .npz (with --input)")
    pr.set_defaults(func=_cmd_predict)

    tg = sub.add_parser("targets", help="print each target's capabilities")
    tg.set_defaults(func=_cmd_targets)

    dv = sub.add_parser("devices", help="list the device profiles `package --device` builds for")
    dv.add_argument("--json", action="store_true", help="print every field of every profile as JSON")
    dv.set_defaults(func=_cmd_devices)

    br = sub.add_parser("broker", help="run an embedded MQTT broker (amqtt) for local use")
    br.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    br.add_argument("--port", type=int, default=1883, help="port (default 1883)")
    br.set_defaults(func=_cmd_broker)

    demo = sub.add_parser(
        "demo",
        help="model to bundles to devices to a staged rollout, on scikit-learn's digits and embedded defaults",
    )
    demo.add_argument("--out", default="demo-out", help="working folder (default: demo-out)")
    demo.add_argument("--quick", action="store_true", help="only package for ONNX Runtime and print the table")
    demo.add_argument(
        "--targets",
        default="onnxruntime,openvino,tflite,coreml",
        help="targets v1 is packaged for (default: all; the devices' onnxruntime, openvino, tflite always)",
    )
    demo.add_argument("--embedded-broker", action="store_true", help="the embedded broker even if Mosquitto is here")
    demo.add_argument("--keep-running", action="store_true", help="leave the fleet up after the summary until Ctrl-C")
    demo.set_defaults(func=_cmd_demo)

    add_fleet_parsers(sub)  # `edgeship fleet ...`, `edgeship rollout ...`
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edgeship``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EdgeshipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
