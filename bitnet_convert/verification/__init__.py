"""`verify CANDIDATE --reference REF`: the proof that a conversion lost nothing, in layers.

  weights   exact: every tensor in canonical form (codes, multipliers, stored values), config fields that
            change the function; declared casts reported with their loss (weights.py)
  function  the JAX engine on both: identical logits, bit for bit (function.py)
  parity    the JAX model against transformers' BitNet on an HF reference, tie-proof (parity.py; needs the
            `reference` extra). It proves the JAX model, so it runs on the reference, not on the candidate
  runtime   the candidate loaded in the runtime that will run it (llama.cpp, ik_llama.cpp, bitnet.cpp), against
            the JAX model under that runtime's arithmetic (runtime.py; needs the runtime's package, or for
            bitnet.cpp a build of it: bitnet_cpp.py)

The default is weights + function: exact, independent of how chaotic the model is, and with no extra installed.
"""

from __future__ import annotations

from bitnet_convert.verification.report import LayerReport, VerifyReport

LEVELS = ("weights", "function", "parity", "runtime")
DEFAULT_LEVELS = ("weights", "function")
RUNTIMES = ("llama.cpp", "ik_llama.cpp", "bitnet.cpp")


def run_verify(candidate: str, reference: str, *, revision: str | None = None, levels=None,
               runtime: str | None = None, head: str = "stored", bitnet_cpp_dir=None) -> VerifyReport:
    from bitnet_convert.formats import registry
    from bitnet_convert.generate_command import release_mapped_pages
    from bitnet_convert.verification.function import compare_function
    from bitnet_convert.verification.weights import compare_weights
    from bitnet_core.errors import ConvertError

    levels = _levels(levels, runtime)
    candidate_format = registry.detect_input_format(candidate)
    cand = registry.read_checkpoint(candidate, candidate_format)
    ref = registry.read_checkpoint(reference, revision=revision)
    if ref.config.get("vocab_size") != cand.config.get("vocab_size"):
        raise ConvertError(f"{candidate}: vocabulary of {cand.config.get('vocab_size')} tokens, the reference "
                           f"{reference} has {ref.config.get('vocab_size')}")
    weights, expected, warnings = compare_weights(cand, ref)
    report = VerifyReport(candidate, reference, candidate_format, [], warnings)
    if "weights" in levels:
        report.layers.append(weights)
    structural = any(f.startswith("config ") or "missing" in f or "not in the reference" in f
                     for f in weights.failures)
    if "function" in levels:
        if structural:
            report.layers.append(LayerReport("function", False, failures=[
                "not run: the candidate's config or tensor set differs from the reference's (see weights)"]))
        else:
            report.layers.append(compare_function(cand, ref, expected, release=release_mapped_pages, head=head))
    if "parity" in levels:
        report.layers.append(_parity(ref, reference, revision))
    if "runtime" in levels:
        from bitnet_convert.verification.function import with_expected
        from bitnet_convert.verification.runtime import check_runtime

        # The runtime is held to the reference's function (as the candidate should hold it), so a file whose
        # values changed fails here too; where the two differ in shape, only the candidate can be run.
        model = cand if structural else with_expected(ref, expected)
        report.layers.append(check_runtime(candidate, cand, runtime, model=model, bitnet_cpp_dir=bitnet_cpp_dir))
    return report


def _levels(levels, runtime) -> tuple[str, ...]:
    from bitnet_core.errors import ConvertError

    if levels is None:
        chosen = list(DEFAULT_LEVELS)
    else:
        chosen = [level.strip() for part in ([levels] if isinstance(levels, str) else levels)
                  for level in part.split(",") if level.strip()]
        unknown = [level for level in chosen if level not in (*LEVELS, "all")]
        if unknown:
            raise ConvertError(f"unknown verify level {unknown[0]!r:.60} (choose from {', '.join(LEVELS)} or all)")
        if not chosen:
            raise ConvertError(f"no verify level given (choose from {', '.join(LEVELS)} or all)")
        if "all" in chosen:
            if chosen != ["all"]:
                raise ConvertError("verify level 'all' stands alone (it means every level)")
            chosen = [level for level in LEVELS if level != "runtime" or runtime]
    if runtime is not None:
        if runtime not in RUNTIMES:
            raise ConvertError(f"unknown runtime {runtime!r} (choose from {', '.join(RUNTIMES)})")
        if "runtime" not in chosen:
            chosen.append("runtime")
    elif "runtime" in chosen:
        raise ConvertError(f"the runtime level needs --runtime ({', '.join(RUNTIMES)})")
    return tuple(chosen)


def _parity(ref, reference: str, revision: str | None) -> LayerReport:
    from bitnet_convert.fileio.hub import resolve_source
    from bitnet_convert.verification.parity import check_parity

    if ref.provenance.get("format") != "hf":
        return LayerReport("parity", None, notes=["skipped: parity needs a Hugging Face reference (transformers "
                                                  "loads only those)"])
    return check_parity(ref, resolve_source(reference, revision))  # safetensors only: reference.py refuses pickles


__all__ = ["DEFAULT_LEVELS", "LEVELS", "RUNTIMES", "LayerReport", "VerifyReport", "run_verify"]
