"""Triton's interpreter without its second patch of triton.language at each helper call (tests).

Under TRITON_INTERPRET=1 a kernel launch (`GridExecutor.__call__`) swaps triton.language's
builtins for interpreted ones for the launch's length, and every call of a `@triton.jit` helper
inside it (`InterpretedFunction.__call__`) patches the same modules again (`_patch_lang`: an
`inspect.getmembers` over triton.language and its tensor class at each call). Our kernels call
many small helpers, and so does triton.language itself (tl.zeros, tl.sum, tl.cdiv are helpers
too): with the patches skipped, `test_tiny_kernel_path_gives_the_reference_logits_in_the_interpreter`
took 76 s instead of 125 (Triton 3.9, a 2-core AVX2 machine).

`install()` skips it where the helper's globals hold no language module already patched in the
launch, and leaves everything else to Triton: the launch still patches and restores, the helper
still runs as Triton rewrote it, and a helper that sees another module (triton.language.core, the
first time in a launch), or a call outside a launch, takes Triton's own path. Where the
interpreter's internals are not the ones this was written against (another Triton), it installs
nothing and says why.
"""

from __future__ import annotations

import threading

_state = threading.local()  # the language modules patched in each enclosing launch (a stack)


def _language_modules(fn, interpreter) -> frozenset[int]:
    """Ids of the modules _patch_lang would patch for fn (triton.language and its core)."""
    tl = interpreter.tl
    return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)


def install() -> str | None:
    """Install the skip; returns None, or why it was not installed."""
    try:
        from triton.runtime import interpreter as interp
    except ImportError as e:
        return f"no Triton interpreter: {e}"
    missing = [n for n in ("GridExecutor", "InterpretedFunction", "InterpreterError", "_patch_lang", "tl")
               if not hasattr(interp, n)]
    if not hasattr(getattr(interp, "InterpretedFunction", None), "rewrite"):
        missing.append("InterpretedFunction.rewrite")
    if missing:
        return f"this Triton's interpreter has no {', '.join(missing)}"
    launch, helper = interp.GridExecutor.__call__, interp.InterpretedFunction.__call__
    if getattr(helper, "_skips_second_patch", False):
        return None

    def launch_call(self, *args, **kwargs):
        stack = _state.__dict__.setdefault("stack", [])
        stack.append(set(_language_modules(self.fn, interp)))
        try:
            return launch(self, *args, **kwargs)
        finally:
            stack.pop()

    def helper_call(self, *args, **kwargs):
        stack = getattr(_state, "stack", None)
        modules = _language_modules(self.fn, interp)
        if not stack or not modules <= stack[-1]:
            # Triton's path; its patch of these modules stays for the launch's length (Triton never
            # undoes a helper's patch), so the launch's later helpers that see them need none
            if stack:
                stack[-1] |= modules
            return helper(self, *args, **kwargs)
        fn = self.rewrite()  # what Triton's __call__ runs after its patch
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interp.InterpreterError(repr(e)) from e

    helper_call._skips_second_patch = True
    helper_call._triton_call = helper
    launch_call._triton_call = launch
    interp.GridExecutor.__call__, interp.InterpretedFunction.__call__ = launch_call, helper_call
    return None


def uninstall() -> None:
    """Triton's own calls again (a test compares the two)."""
    from triton.runtime import interpreter as interp

    for cls in (interp.GridExecutor, interp.InterpretedFunction):
        original = getattr(cls.__call__, "_triton_call", None)
        if original is not None:
            cls.__call__ = original
