"""Run folders and models on shared storage named by a URI (`s3://bucket/runs`, `gs://...`,
`hdfs://...`), read and written through pyarrow.fs, so every node of a cluster sees the same
run: the driver's records, learner rank 0's checkpoints (written from its own node), Ray
Train's storage and the chain's model hand-offs.

A URI folder has a local staging copy on each node that writes to it (`staging_for`): files
are written there crash-safe (rlaif_ray.storage) and then uploaded one by one (`push`). An
object store writes each object whole, so a reader sees an old or a new file, never a mix; a
folder is whole when the file that lists it is (a checkpoint's trainer_state.json is uploaded
last, and checkpoints/latest names a checkpoint only after its files are checked).

Credentials and endpoints come from the environment, as every S3 client reads them
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible server;
GOOGLE_APPLICATION_CREDENTIALS), never from the config, so they never reach a log.

A base module: it imports only `rlaif_ray.config` and `rlaif_ray.storage`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rlaif_ray.config import URI_RE
from rlaif_ray.storage import PARTIAL, RunStateError, atomic_write_json, publish_dir, temp_path


def is_uri(location) -> bool:
    """Whether `location` names shared storage by URI (file:// is a local path)."""
    m = URI_RE.match(str(location))
    return bool(m) and m.group(1).lower() != "file"


def local_path(location) -> Path:
    """A path, or a file:// URI, as a Path."""
    m = URI_RE.match(str(location))
    return Path(m.group(2)) if m and m.group(1).lower() == "file" else Path(location)


def join(location, *parts: str) -> str:
    """`location`/parts for a URI or a path."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location).joinpath(*parts))


def as_location(location) -> Path | str:
    """A URI stays a string; anything else becomes a Path."""
    return str(location) if is_uri(location) else Path(location)


def parent(location) -> Path | str:
    """The folder that holds `location` (a URI or a path)."""
    return str(location).rstrip("/").rsplit("/", 1)[0] if is_uri(location) else Path(location).parent


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI. An S3-compatible server other than
    AWS comes from AWS_ENDPOINT_URL (the variable the AWS SDKs read)."""
    import pyarrow.fs as pafs

    m = URI_RE.match(uri)
    try:
        if m and m.group(1).lower() == "s3" and os.environ.get("AWS_ENDPOINT_URL"):
            return pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"]), m.group(2).rstrip("/")
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    except (OSError, ValueError, ImportError) as err:
        raise RunStateError(f"{uri}: cannot open this storage ({str(err).splitlines()[0][:160]})") from None


def staging_root() -> Path:
    """Where a node keeps its local copies of URI folders (RLAIF_RAY_STAGING, else the temp
    folder): a fast local disk, never the shared one."""
    return Path(os.environ.get("RLAIF_RAY_STAGING") or Path(tempfile.gettempdir()) / "rlaif-ray-staging")


def staging_for(uri: str) -> Path:
    """This node's local copy of the URI folder `uri`: staging_root()/SCHEME/BUCKET/PATH."""
    m = URI_RE.match(uri)
    parts = [p for p in m.group(2).split("/") if p and p not in (".", "..")]
    return staging_root().joinpath(m.group(1).lower(), *parts)


class StorageFolder:
    """The folder at `location` (a URI, or a local path: the same calls through pyarrow's
    LocalFileSystem), with this node's copy `local` (for a URI its staging folder, for a path
    the folder itself: push and pull are then no-ops). Paths inside are relative ("a/b")."""

    def __init__(self, location, local: Path | None = None):
        import pyarrow.fs as pafs

        self.remote = is_uri(location)
        if self.remote:
            self.uri = str(location).rstrip("/")
            self.fs, self.root = filesystem(self.uri)
            self.local = Path(local) if local is not None else staging_for(self.uri)
            self._sent: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) of what push sent
            self._dirs: set[str] = set()
        else:
            self.local = local_path(location).expanduser().resolve()
            self.uri, self.fs, self.root = str(self.local), pafs.LocalFileSystem(), self.local.as_posix()

    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel.strip('/')}" if rel.strip("/") else self.root

    def info(self, rel: str = ""):
        return self.fs.get_file_info(self._remote(rel))

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.info(rel).type != pafs.FileType.NotFound

    def is_dir(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.info(rel).type == pafs.FileType.Directory

    def files(self, rel: str = "", recursive: bool = True) -> dict[str, int]:
        """{path relative to `rel`: size} of the files under `rel` (none when it does not exist)."""
        import pyarrow.fs as pafs

        base = self._remote(rel)
        sel = pafs.FileSelector(base, allow_not_found=True, recursive=recursive)
        return {i.path[len(base) + 1:]: i.size for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File}

    def entries(self, rel: str = "") -> list[str]:
        """Names directly under `rel` (files and folders)."""
        import pyarrow.fs as pafs

        base = self._remote(rel)
        return sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._remote(rel)) as f:
            return f.read()

    def open(self, rel: str):
        """A random-access reader (seek, read) of one file."""
        return self.fs.open_input_file(self._remote(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._remote(rel)) as f:
            f.write(data)

    def write_json(self, rel: str, data) -> None:
        """A JSON file written crash-safe here and uploaded (a local folder: written only)."""
        atomic_write_json(self.local / rel, data)
        self.push(rel)

    def delete(self, rel: str = "") -> None:
        import pyarrow.fs as pafs

        info = self.info(rel)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self._remote(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self._remote(rel))

    def push(self, rel: str = "", skip: tuple[str, ...] = (), last: str | None = None, keep=None) -> int:
        """Upload local/rel (a file, or a folder's files) to the URI; temp files of a write in
        progress, top-level entries in `skip` and files for which `keep(name)` is false stay
        behind; `last` (a file name) goes after every other file, so a reader that trusts it
        sees the rest complete. Returns bytes sent."""
        src = self.local / rel if rel else self.local
        if not self.remote:
            return 0
        if src.is_file():
            return self._upload(src, rel)
        files = sorted(p for p in src.rglob("*") if p.is_file() and PARTIAL not in str(p.relative_to(src))
                       and p.relative_to(src).parts[0] not in skip
                       and (keep is None or keep(p.relative_to(src).as_posix())))
        files.sort(key=lambda p: p.name == last)  # stable: `last` moves to the end
        return sum(self._upload(p, "/".join(filter(None, [rel, p.relative_to(src).as_posix()]))) for p in files)

    def _upload(self, src: Path, rel: str) -> int:
        """One file up, unless this folder already sent it unchanged (size and mtime): a run's
        final push sends only what is new. Returns bytes sent."""
        import pyarrow.fs as pafs

        st = src.stat()
        if self._sent.get(rel) == (st.st_size, st.st_mtime_ns):
            return 0
        parent = self._remote(rel).rsplit("/", 1)[0]
        if parent not in self._dirs:  # an object store needs none, a file system does: once each
            self.fs.create_dir(parent, recursive=True)
            self._dirs.add(parent)
        pafs.copy_files(str(src), self._remote(rel), destination_filesystem=self.fs)
        self._sent[rel] = (st.st_size, st.st_mtime_ns)
        return st.st_size

    def pull(self, rel: str = "", skip: tuple[str, ...] = (), keep=None) -> Path:
        """Download the URI's rel (a file or a folder) over local/rel; top-level entries in
        `skip`, and files for which `keep(name)` is false, are left out. Returns the local path."""
        import pyarrow.fs as pafs

        dest = self.local / rel if rel else self.local
        if not self.remote:
            return dest
        if self.info(rel).type == pafs.FileType.File:
            dest.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(self._remote(rel), str(dest), source_filesystem=self.fs)
            return dest
        for name in self.files(rel):
            if name.split("/")[0] in skip or (keep is not None and not keep(name)):
                continue
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(self._remote(f"{rel}/{name}" if rel else name), str(dest / name), source_filesystem=self.fs)
        return dest


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_files(name: str) -> bool:
    """What loading a model needs from a folder: all but a checkpoint's optimizer state and
    DCP shards (2/3 of a checkpoint's bytes)."""
    return name != "optimizer.safetensors" and not name.startswith("dcp/")


def meta_files(name: str) -> bool:
    """What a process that loads no weights needs (config, tokenizer)."""
    return model_files(name) and not name.endswith(WEIGHT_FILES)


def materialize(uri: str, cache: Path, keep=None) -> Path:
    """A URI folder (a model, a checkpoint) downloaded once to `cache` on this node, whole
    (or the files for which `keep(name)` is true): into a temp folder, then renamed, so a crash
    mid-download leaves nothing that looks complete. A copy already there is used when its
    files and sizes are the folder's (one listing call)."""
    folder = StorageFolder(uri)
    if not folder.is_dir():
        raise RunStateError(f"{uri}: no such folder")
    wanted = {k: v for k, v in folder.files().items() if keep is None or keep(k)}
    parts = [p for p in URI_RE.match(uri).group(2).split("/") if p and p not in (".", "..")]
    final = cache.joinpath(URI_RE.match(uri).group(1).lower(), *parts)
    final.parent.mkdir(parents=True, exist_ok=True)
    # one fetch per node: the ranks or actors of one node that ask at once wait for the first
    from filelock import FileLock

    with FileLock(final.parent / f".{final.name}.lock"):
        if final.is_dir() and {p.relative_to(final).as_posix(): p.stat().st_size
                               for p in final.rglob("*") if p.is_file()} == wanted:
            return final  # fetched before, and the folder there is still the same
        tmp = temp_path(final)
        try:
            StorageFolder(uri, tmp).pull(keep=lambda name: name in wanted)
            publish_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
