"""Start-up hook of the img2dataset download workers (stage 1, ingest): install the egress policy.

``unclip.data.egress.worker_env`` puts this file's directory first on ``PYTHONPATH``, so every Python
process started with that environment (img2dataset's ``spawn`` workers included) imports it at
start-up. It first imports the ``sitecustomize`` it shadows, if any; then, when
``$UNCLIP_EGRESS_POLICY`` is set, it installs the policy-enforcing urllib opener. If that fails it
installs one that refuses every request (fail closed) and says so in one line on stderr; it never
stops the interpreter from starting. When ``$UNCLIP_SHARD_TAR_FORMAT`` is set it makes that tar
format the process's default (``egress.set_tar_format_from_env``: shards without a PAX header a
member). ``python -S``, ``-I`` or ``-E`` skip it (no site import, or no PYTHONPATH), so img2dataset
must not be started with them.
"""

import os
import sys

_ENV = "UNCLIP_EGRESS_POLICY"
_TAR_ENV = "UNCLIP_SHARD_TAR_FORMAT"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _refuse_everything(reason: str) -> None:
    import urllib.error
    import urllib.request

    class _Refuse(urllib.request.BaseHandler):
        def default_open(self, req):
            raise urllib.error.URLError(f"egress policy unavailable, nothing is fetched: {reason}")

    opener = urllib.request.OpenerDirector()
    opener.add_handler(_Refuse())
    urllib.request.install_opener(opener)


def _egress():
    try:
        from unclip.data import egress
    except ModuleNotFoundError as err:
        if err.name not in ("unclip", "unclip.data"):
            raise
        # unclip is not installed: use the tree this file belongs to (.../unclip/data/workerboot).
        root = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))
        sys.path.append(root)
        try:
            from unclip.data import egress
        finally:
            sys.path.remove(root)
    return egress


def _install() -> None:
    try:
        _egress().install_from_env()
    except Exception as err:  # noqa: BLE001 -- start-up must go on, but without a way out
        print(f"unclip sitecustomize: egress policy not installed, refusing all urllib fetches: "
              f"{type(err).__name__}: {err}", file=sys.stderr)
        _refuse_everything(f"{type(err).__name__}: {err}")


def _set_tar_format() -> None:
    try:
        _egress().set_tar_format_from_env()
    except Exception as err:  # noqa: BLE001 -- the shards are still valid tar files, only larger
        print(f"unclip sitecustomize: shard tar format not set: {type(err).__name__}: {err}", file=sys.stderr)


def _chain() -> None:
    """Import the sitecustomize this one shadows (a system or venv one), as if we were not here."""
    me = sys.modules.pop("sitecustomize", None)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    try:
        import sitecustomize  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name != "sitecustomize":
            print(f"unclip sitecustomize: the shadowed sitecustomize failed: {err}", file=sys.stderr)
    except Exception as err:  # noqa: BLE001
        print(f"unclip sitecustomize: the shadowed sitecustomize failed: {type(err).__name__}: {err}",
              file=sys.stderr)
    finally:
        sys.path[:] = saved
        if me is not None:
            sys.modules["sitecustomize"] = me


# Chain first, so that ours is the opener left installed even if the other one installs its own.
_chain()
if os.environ.get(_ENV):
    _install()
if os.environ.get(_TAR_ENV):
    _set_tar_format()
