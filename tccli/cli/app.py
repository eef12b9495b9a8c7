"""The `tc` command: a thin layer that parses flags and calls library code.

Each subcommand is a function here whose options come from one config dataclass (see
``tccli.config.fields``). No math lives in this module. Data goes to stdout or named files; progress and
logs go to stderr; bad input ends with one line ``tc: error: ...`` and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn, Optional

import typer

from tccli import __version__
from tccli.cli.options import command_from, multi_value_flags, plain_arguments
from tccli.config.circuit import CircuitConfig, DeembedConfig, ExportConfig
from tccli.config.data import CacheConfig
from tccli.config.evaluation import EvalConfig, GreaterThanConfig, PlotConfig, ValidateConfig
from tccli.config.features import ScoreConfig, ShowConfig
from tccli.config.graph import GraphConfig
from tccli.config.replacement import InterveneConfig
from tccli.config.serve import ServeConfig
from tccli.config.training import TrainConfig
from tccli.config.transcoders import ConvertConfig
from tccli.config.view import ViewConfig
from tccli.errors import TcError
from tccli.runtime import inputs, interrupts, outputs, progress


def _exception_classes(name: str) -> tuple[type, ...]:
    """``name`` from click and from typer's bundled copy of click (typer 0.29 raises its own)."""
    import importlib

    found = []
    for module in ("click.exceptions", "typer._click.exceptions", "typer.exceptions", "typer"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


_ABORT = _exception_classes("Abort") + (KeyboardInterrupt,)
_NO_ARGS_IS_HELP = _exception_classes("NoArgsIsHelpError")
_CLICK_ERROR = _exception_classes("ClickException")
_EXIT = _exception_classes("Exit")

app = typer.Typer(
    name="tc",
    help="tc: transcoder circuits from the command line (cache, train, eval, score, circuit).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options that take several values after one flag (`--data a.txt b.txt`, declared ``several`` in their
# settings); click options take one value each, so main() rewrites `--data a b` as `--data a --data b`
# before parsing.
MULTI_VALUE_OPTIONS = multi_value_flags(
    [
        CacheConfig,
        CircuitConfig,
        DeembedConfig,
        EvalConfig,
        ExportConfig,
        GraphConfig,
        GreaterThanConfig,
        InterveneConfig,
        PlotConfig,
        ScoreConfig,
        ShowConfig,
        TrainConfig,
        ValidateConfig,
        ConvertConfig,
        ViewConfig,
    ]
)


def example(*lines: str) -> str:
    """A command's --help epilog: one example, kept as written (click's \\b stops re-wrapping)."""
    return "\b\nExample:\n" + "\n".join("  " + line for line in lines)


def _version_callback(value: bool) -> None:
    if value:
        print(f"tc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """tc: transcoder circuits from the command line."""


# ============================================================================ tc cache / tc info (issue 2)


@app.command("cache", epilog=example("tc cache --model gpt2 --data corpus.txt --layers all --tokens 1M --out acts.h5"))
@command_from(CacheConfig)
def cache_command(config: CacheConfig) -> None:
    """Run a model over text; store each chosen layer's MLP input and output in HDF5."""
    from tccli.data.cache_format import human_bytes
    from tccli.data.cache_writer import cache_output, write_cache
    from tccli.model.loading import load_model

    log = (lambda message: None) if config.quiet else (lambda message: print(f"tc cache: {message}", file=sys.stderr))
    with progress.bar(config.quiet, "tokens") as update, cache_output(config) as output:
        # inside the block: the output is checked and locked first, and under torchrun each rank loads the
        # model once it has joined the process group (on its own device)
        loaded = load_model(config.model, config.device, config.model_dtype)
        result = write_cache(output, loaded, log=log, progress=lambda done, total: update("caching", done, total))
    if not config.quiet and result.seconds > 0:
        done = result.n_tokens - result.resumed_from_row * int(config.context)
        log(
            f"wrote {result.path} ({result.n_tokens} tokens, {human_bytes(result.path.stat().st_size)}) "
            f"in {result.seconds:.1f} s, {done / result.seconds:,.0f} tokens/s"
        )


@app.command("info", epilog=example("tc info acts.h5"))
def info_command(
    path: str = typer.Argument(
        ..., help="A cache (.h5), transcoder folder or set, or graph JSON; - reads a graph from stdin.", metavar="PATH"
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON for scripts."),
) -> None:
    """Summarise a tc file: activation cache, transcoder(s), or graph."""
    import json as _json

    from tccli.cli.info import describe, render

    summary = describe(path)
    print(_json.dumps(summary, indent=2) if json_output else render(summary))


info_command.stdio_params = frozenset({"path"})  # type: ignore[attr-defined]  # shell completion offers `-`


# ============================================================================ tc train / tc eval (issue 3)

# ---------------------------------------------------------------------------- tc train


@app.command("train", epilog=example("tc train --cache acts.h5 --out tcs --tokens 400k --k 8"))
@command_from(TrainConfig)
def train_command(config: TrainConfig) -> None:
    """Train one transcoder (or MLP-output SAE) per layer, or with --kind clt one cross-layer transcoder over
    every layer, from an activation cache."""
    from tccli.training.train import train

    train(config)
    print(config.out)


# ---------------------------------------------------------------------------- tc plot (issue 12)


@app.command("plot", epilog=example("tc plot pareto runs/k8/eval.json runs/k16/eval.json -o pareto.svg"))
@command_from(PlotConfig)
def plot_command(config: PlotConfig) -> None:
    """Figures: `tc plot pareto EVAL.json... -o f.svg` (CE recovered against L0, one series per kind) or
    `tc plot training train_log.jsonl... -o f.svg` (loss, FVU, L0, dead fraction against tokens)."""
    from tccli.evaluation.plot import run_plot

    print(run_plot(config))


# ---------------------------------------------------------------------------- tc eval


@app.command("eval", epilog=example("tc eval --model gpt2 --transcoders tcs --data held-out.txt --tokens 10k"))
@command_from(EvalConfig)
def eval_command(config: EvalConfig) -> None:
    """Measure transcoders: L0, FVU, dead/dense features, next-token CE with each MLP replaced."""
    from tccli.evaluation.evaluate import load_eval_inputs, result_table, run_eval

    with progress.bar(config.quiet, "batches") as update:
        loaded, transcoders, tokens = load_eval_inputs(config)
        result = run_eval(config, loaded, transcoders, tokens, update)
    if config.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        from rich.console import Console

        console = Console(highlight=False)
        if not console.is_terminal:  # a pipe or file: do not squeeze the columns to 80 characters
            console = Console(highlight=False, width=200)
        console.print(result_table(result, wide=config.wide))


# ---------------------------------------------------------------------------- tc convert


@app.command("convert", epilog=example("tc convert --input tcs --out tcs-saelens --to saelens"))
@command_from(ConvertConfig)
def convert_command(config: ConvertConfig) -> None:
    """Convert transcoders between tc folders and every public format (see tc info's formats)."""
    from tccli.transcoders.formats import convert

    notes: list[str] = []
    for folder in convert(config.input, config.out, config.to, notes=notes):
        print(folder)
    for note in notes:
        print(f"tc convert: note: {note}", file=sys.stderr)


# ============================================================================ tc circuit / export / deembed (issue 4)


@app.command(
    "circuit",
    epilog=example(
        "tc circuit --transcoders tcs --logit-diff 40 20 --format json --out g.json \\",
        "    --prompt 'The war lasted from the year 1735 to the year 17'",
    ),
)
@command_from(CircuitConfig)
def circuit_command(config: CircuitConfig) -> None:
    """Trace the paths into a feature, logit or direction; the graph goes to stdout (or --out)."""
    from tccli.circuit import files as circuit_files
    from tccli.circuit.trace import circuit_graph
    from tccli.model.loading import load_model
    from tccli.transcoders.formats import load_transcoders

    prompt = inputs.prompt_text(config.prompt)
    with (
        outputs.claim(config.out, config.force, [config.transcoders, config.direction, config.model]),
        progress.bar(config.quiet, "steps") as update,
    ):
        update("loading the model", 0, 1)
        loaded = load_model(config.model, config.device, config.model_dtype)
        # a per-layer set or a cross-layer transcoder, whose decoders stay on disk: only the active features'
        # rows are read
        transcoders = load_transcoders(config.transcoders, loaded.device, lazy_decoders=True)
        update("loading the model", 1, 1)
        update("tracing the circuit", 0, 1)
        graph, summary = circuit_graph(loaded, transcoders, prompt, config)
        update("tracing the circuit", 1, 1)
        outputs.write_output(circuit_files.render(graph, config.format, config), config.out)
    if not config.quiet:
        print(
            f"tc circuit: {summary['nodes']} nodes, {summary['edges']} edges; target {summary['value']:.6g}, "
            f"explained by the graph's direct inputs {summary['explained']:.6g} ({summary['fraction']:.1%}), "
            f"transcoder error into the target {summary['error']:.6g}",
            file=sys.stderr,
        )


@app.command("export", epilog=example("tc export g.json --format svg --out g.svg"))
@command_from(ExportConfig)
def export_command(config: ExportConfig) -> None:
    """Convert a graph saved with `tc circuit --format json` to dot, svg, png, graphml or neuronpedia."""
    from tccli.circuit import files as circuit_files
    from tccli.circuit import neuronpedia

    if config.format == "png":
        outputs.check_binary_stdout(config.out, "--format png")
    with outputs.claim(config.out, config.force, [config.graph]):
        graph = circuit_files.read_graph(config.graph)  # `-`: stdin
        neuronpedia.name_graph(graph, config.scan, config.slug)
        outputs.write_output(circuit_files.render(graph, config.format, config), config.out)


@app.command("view", epilog=example("tc view g.json --features features.h5 --out g.html"))
@command_from(ViewConfig)
def view_command(config: ViewConfig) -> None:
    """Write a graph as one self-contained HTML page to explore in a browser, offline (pan, zoom, hover, click,
    search, pin nodes, group supernodes, save a subgraph that tc validate reads)."""
    from tccli.view.graph_files import read_any_graph
    from tccli.view.page import render_page

    inputs.one_stdin(GRAPH=config.graph, **{"--features": config.features})
    graph = read_any_graph(config.graph)  # the inputs' own complaints first
    features = None
    if config.features:
        from tccli.features.files import FeaturesFile

        features = FeaturesFile.open(config.features)
    with outputs.claim(config.out, config.force, [config.graph, config.features]):
        title = os.path.basename(inputs.display_name(config.graph))
        page = render_page(graph, features, config.examples, config.min_edge, title=title)
        outputs.write_output(page.encode("utf-8"), config.out)  # `-`: stdout
    print(
        f"tc view: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges -> "
        f"{'stdout' if outputs.to_stdout(config.out) else config.out}",
        file=sys.stderr,
    )


@app.command("deembed", epilog=example("tc deembed --transcoders tcs --feature L0.F339 --top 10"))
@command_from(DeembedConfig)
def deembed_command(config: DeembedConfig) -> None:
    """Top tokens of W_E f_enc for a feature (optionally through one head's OV circuit): score, id, token."""
    from tccli.features.deembed import deembed_rows
    from tccli.model.loading import load_model
    from tccli.transcoders.formats import load_transcoders

    loaded = load_model(config.model, config.device, config.model_dtype)
    transcoders = load_transcoders(config.transcoders, loaded.device)  # a CLT: its layers' encoders
    for score, token_id, token in deembed_rows(loaded, transcoders, config):
        print(f"{score:.6g}\t{token_id}\t{json.dumps(token, ensure_ascii=False)}")


# ============================================================================ tc score / tc show (issue 5)


@app.command("score", epilog=example("tc score --transcoders tcs --data corpus.txt --tokens 1M --out features.h5"))
@command_from(ScoreConfig)
def score_command(config: ScoreConfig) -> None:
    """Describe features in one pass: density, top and quantile examples, de-embeddings, logit effects."""
    from tccli.features.score import load_score_inputs, run_score

    log = (lambda message: None) if config.quiet else (lambda message: print(f"tc score: {message}", file=sys.stderr))
    input_paths = [*config.data, config.transcoders, config.model]
    if config.format == "neuronpedia-features":  # --out DIR/: one writer at a time; the files go in at the end
        if config.scan:  # a scan tc cannot place, or files already there: refused before anything is loaded
            from pathlib import Path

            from tccli.features.neuronpedia import check_scan_folder

            check_scan_folder(Path(config.out).expanduser(), config.scan, config.force)
        claim = outputs.claim_folder(config.out, input_paths)
    else:
        claim = outputs.claim(config.out, config.force, input_paths)
    with progress.bar(config.quiet, "rows") as update, claim:
        loaded, transcoders, rows = load_score_inputs(config)
        summary = run_score(config, loaded, transcoders, rows, update, log=log)
    if not config.quiet:
        console = progress.stderr_console()
        if summary["available_tokens"] is not None:
            console.print(f"the data holds only {summary['available_tokens']} tokens; scored {summary['tokens']}")
        console.print(
            f"scored layers {', '.join(map(str, summary['layers']))} on {summary['tokens']} tokens -> {summary['out']}"
        )


@app.command("show", epilog=example("tc show features.h5 L2.F57"))
@command_from(ShowConfig)
def show_command(config: ShowConfig) -> None:
    """Show features from a features file: one in the terminal, or many as one HTML page (--html)."""
    from rich.console import Console

    from tccli.features.files import FeaturesFile, check_features_match_model
    from tccli.features.show import render_html, render_terminal, resolve_refs
    from tccli.nodes import parse_feature

    features = FeaturesFile.open(config.features_file)
    with outputs.claim(config.html, config.force, [config.features_file]):
        if config.model:
            from tccli.model.loading import load_model

            check_features_match_model(features, load_model(config.model, "cpu").info)
        if config.feature:
            layer, index = parse_feature(config.feature)
            features.check_feature(layer, index)
            console = Console(highlight=False)
            if not console.is_terminal:
                console = Console(highlight=False, width=160)
            render_terminal(features, features.feature(layer, index), config.examples, console)
        if config.html:
            page = render_html(features, resolve_refs(features, config), config.examples)
            outputs.write_output(page.encode("utf-8"), config.html)  # `-`: stdout


# ============================================================================ tc greater-than (issue 6)


@app.command("greater-than", epilog=example("tc greater-than --transcoders tcs --graph g.json"))
@command_from(GreaterThanConfig)
def greater_than_command(config: GreaterThanConfig) -> None:
    """The greater-than task: probability difference, clean and with MLPs replaced by transcoders."""
    from tccli.evaluation.greater_than import load_greater_than_inputs, result_lines, run_greater_than

    with progress.bar(False, "runs") as update:
        loaded, transcoders, graph = load_greater_than_inputs(config)
        result = run_greater_than(config, loaded, transcoders, graph, update)
    if config.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(result_lines(result)))


# ============================================================================ tc graph (issue 13)


@app.command(
    "graph",
    epilog=example(
        "tc graph --transcoders tcs --format dot --out g.dot \\",
        "    --prompt 'The war lasted from the year 1735 to the year 17'",
    ),
)
@command_from(GraphConfig)
def graph_command(config: GraphConfig) -> None:
    """Whole attribution graph of the local replacement model, pruned by influence and scored."""
    from tccli.circuit import neuronpedia
    from tccli.graph import files as graph_files
    from tccli.graph.trace import attribution_graph
    from tccli.model.loading import load_model
    from tccli.transcoders.formats import load_transcoders

    if config.format == "pt":
        outputs.check_binary_stdout(config.out, "--format pt")
    prompt = inputs.prompt_text(config.prompt)
    log = (lambda message: None) if config.quiet else (lambda message: print(f"tc graph: {message}", file=sys.stderr))
    input_paths = [config.transcoders, config.model]
    out, folder = config.out, None
    if config.out_folder:  # --out DIR/: the graph is DIR/SLUG.json, listed in DIR/graph-metadata.json
        folder = outputs.output_folder(config.out_folder, input_paths)
        neuronpedia.read_graph_index(folder / neuronpedia.GRAPH_INDEX)  # a list tc cannot update stops it now
        out = str(folder / f"{config.graph_slug(prompt)}.json")
    with (
        outputs.claim(out, config.force, input_paths),
        progress.bar(config.quiet, "rows") as update,
    ):
        loaded = load_model(config.model, config.device, config.model_dtype)
        # a per-layer set or a cross-layer transcoder, whose decoders stay on disk: only the active features'
        # rows are read
        transcoders = load_transcoders(config.transcoders, loaded.device, lazy_decoders=True)
        run = attribution_graph(
            loaded, transcoders, prompt, config, lambda done, total: update("feature rows", done, total)
        )
        data = graph_files.render(run.graph, run.metadata, run.strings, run.tokens, config.format, run.heads, config)
        outputs.write_output(data, out)
        if folder is not None:
            index = neuronpedia.add_to_graph_index(folder, neuronpedia.index_entry(data))
            log(f"wrote {out} (scan {run.metadata['scan']!r}), listed in {index}")
    graph, stats = run.graph, run.graph.stats
    log(
        f"{graph.n_active_features} active features, {graph.table.n_features} with rows; kept "
        f"{int(graph.node_mask.sum())} nodes ({int(graph.node_mask[: graph.table.n_features].sum())} features), "
        f"{sum(int(m.sum()) for m in graph.edge_mask)} edges; replacement score {graph.replacement:.4f}, "
        f"completeness score {graph.completeness:.4f}; dropped {stats['dropped_share_total']:.2%} of sum |A| "
        f"({stats['dropped_small_share']:.2%} small entries, {stats['dropped_budget_share']:.2%} from features "
        f"without rows); {stats['stored_entries']:,} entries stored"
    )


# ============================================================================ tc intervene / tc validate (issue 14)


@app.command(
    "intervene",
    epilog=example(
        "tc intervene --transcoders tcs --logit-diff 40 20 --ablate mlp0.f339@12 \\",
        "    --prompt 'The war lasted from the year 1735 to the year 17'",
    ),
)
@command_from(InterveneConfig)
def intervene_command(config: InterveneConfig) -> None:
    """Ablate, set or scale features, head terms and error terms in the replacement model; print what moved."""
    from tccli.model.loading import load_model
    from tccli.replacement.intervention import intervene_lines, run_intervene
    from tccli.transcoders.formats import load_transcoders

    inputs.one_stdin(**{"--prompt": config.prompt, "--features": config.features})
    prompt = inputs.prompt_text(config.prompt)
    loaded = load_model(config.model, config.device, config.model_dtype)
    transcoders = load_transcoders(config.transcoders, loaded.device)  # a per-layer set or a cross-layer transcoder
    result = run_intervene(config, loaded, transcoders, prompt)
    print(json.dumps(result, indent=2) if config.json else "\n".join(intervene_lines(result)))


@app.command("validate", epilog=example("tc validate g.json --task greater-than --out g-validated.json"))
@command_from(ValidateConfig)
def validate_command(config: ValidateConfig) -> None:
    """Test a circuit graph against the model: necessity, sufficiency, per-node faithfulness, random baseline."""
    from tccli.circuit.files import read_graph
    from tccli.evaluation.validation import (
        input_paths,
        load_validation_inputs,
        results_json,
        run_validation,
        summary_lines,
        write_validated_graph,
    )

    inputs.one_stdin(GRAPH=config.graph, **{"--prompts": config.prompts, "--features": config.features})
    graph = read_graph(config.graph)  # its metadata names the model and transcoders to load; `-`: stdin
    meta = graph.graph.get("metadata", {})
    with (
        outputs.claim(config.out, config.force, input_paths(config, meta)),
        progress.bar(False, "rows") as update,
    ):
        loaded, transcoders, means, prompts = load_validation_inputs(config, meta)
        # the bar names each group of prompts
        results = run_validation(config, graph, loaded, transcoders, means, prompts, update=update)
        if config.out:
            write_validated_graph(graph, results, config.out)
    print("\n".join(summary_lines(results)), file=sys.stderr)
    if config.json:
        print(results_json(results))


@app.command(
    "serve", epilog=example("tc serve --transcoders tcs --features features.h5  # then open http://127.0.0.1:8000/")
)
@command_from(ServeConfig)
def serve_command(config: ServeConfig) -> None:
    """Serve tc view's page on a local web server that also computes graphs for typed prompts, interventions
    and validations on the model (no authentication: keep --host on the loopback). Ctrl-C stops it."""
    from tccli.serve.server import serve

    serve(config)


# ============================================================================ entry point


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """`--data a b --x` -> `--data a --data b --x` for the options in MULTI_VALUE_OPTIONS."""
    out: list[str] = []
    current: Optional[str] = None
    for arg in argv:
        if arg in MULTI_VALUE_OPTIONS:
            current = arg
            out.append(arg)
            continue
        if current is not None and (arg == "-" or not arg.startswith("-")):
            if out[-1] != current:
                out.append(current)
            out.append(arg)
            continue
        current = None
        out.append(arg)
    return out


def _exit_torchrun_rank() -> None:
    """End a torchrun rank's successful run without C++ teardown.

    With the gloo backend a rank sometimes aborts in torch's exit-time destructors ("terminate called
    without an active exception", no Python frame), after every file is written and the process group
    destroyed; torchrun then reports the whole run failed. All our files are closed by now, so flush
    the streams and leave at once.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class _StdoutClosed(Exception):
    """The reader of stdout went away (`tc graph ... | head -c 10`) while a command wrote to it."""


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reading end is closed: poll says POLLERR or POLLHUP."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no stdout to ask about
        return False


def _closed_stdout_ends_quietly(command: Any) -> Any:
    """Make a BrokenPipeError on stdout inside a subcommand reach main() as ``_StdoutClosed``: typer would
    otherwise catch it (as an OSError) and exit 1. A BrokenPipeError of another pipe is left as it was."""

    def guarded(callback: Callable) -> Callable:
        @functools.wraps(callback)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except BrokenPipeError:
                if not _stdout_reader_gone():
                    raise
                raise _StdoutClosed() from None

        return run

    for sub in getattr(command, "commands", {}).values():
        if sub.callback is not None:
            sub.callback = guarded(sub.callback)
    return command


def _stdout_closed() -> NoReturn:
    """`tc ... | head`: the reader went away, which is not an error of ours. End at once and quietly (no
    message, no traceback; what is still buffered goes to /dev/null), with the status of a Unix tool ended by
    SIGPIPE, 141, so `set -o pipefail` sees the output was cut. Outputs to files were left by the unwinding
    (``outputs.atomic_write`` puts nothing partial in place)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)


def _interrupted(args: list[str], signum: int = 2, detail: str = "") -> None:
    print(f"tc: interrupted; {detail or interrupts.hint(args)}", file=sys.stderr)
    sys.exit(128 + signum)


def main(argv: Optional[list[str]] = None) -> None:
    """Run `tc`; turn every failure into one line on stderr and a non-zero exit."""
    interrupts.install()
    inputs.forget_stdin()  # a run starts with stdin unread (tests run several in one process)
    args = expand_multi_value_options(list(sys.argv[1:] if argv is None else argv))
    command = _closed_stdout_ends_quietly(plain_arguments(typer.main.get_command(app)))
    try:
        result = command.main(args=args, prog_name="tc", standalone_mode=False)
        sys.stdout.flush()  # here, not at exit: a reader gone by now is handled below
        if result == 130:  # typer's answer to a KeyboardInterrupt that did not come from our handler
            _interrupted(args)
        if interrupts.swallowed() is not None:  # a signal's Interrupted was lost in a finaliser
            _interrupted(args, interrupts.swallowed())
        _exit_torchrun_rank()
    except interrupts.Interrupted as exc:
        _interrupted(args, exc.signum, exc.detail)
    except TcError as exc:
        print(f"tc: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except _ABORT:
        _interrupted(args)
    except _NO_ARGS_IS_HELP as exc:
        print(exc.ctx.get_help() if exc.ctx else str(exc), file=sys.stderr)
        sys.exit(2)
    except _CLICK_ERROR as exc:
        print(f"tc: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except _EXIT as exc:
        sys.exit(exc.exit_code)
    except (_StdoutClosed, BrokenPipeError):
        _stdout_closed()
    except Exception as exc:  # a bug of ours: still one line, the traceback only on request
        if os.environ.get("TC_DEBUG"):
            raise
        print(f"tc: internal error: {type(exc).__name__}: {exc} (set TC_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
