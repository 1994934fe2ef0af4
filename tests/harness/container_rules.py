"""How a container's process is made from its image and its pod spec: the rules a container image
builder, the kubelet and a container runtime follow, written once for both places where the tests
start pods: the node agent (tests/harness/node_agent.py, local processes) and the real runtime
(tests/e2e/test_containers.py, podman).

Sources of truth, each followed as written there:
- The image's configuration (ENTRYPOINT, CMD, ENV, WORKDIR, USER) is read from the build target
  in the project's Dockerfile, as the builder records it: instructions of a stage add to what its
  FROM gives; an ENTRYPOINT resets a CMD the stage inherited; shell-form ENTRYPOINT/CMD become
  `/bin/sh -c "…"`. (tests/e2e/test_containers.py checks this reading against `podman image inspect` of the
  images built from the same Dockerfile.)
- Kubernetes' container command rules (Pod API, "Define a Command and Arguments for a Container"):
  `command` replaces the image's ENTRYPOINT and then the image's CMD is ignored; `args` alone
  replaces CMD and keeps ENTRYPOINT; with neither the image's ENTRYPOINT + CMD run.
- `$(VAR)` references in `command`, `args` and env values are expanded from the container's env
  as the pod spec defines it (not the image's ENV); `$$` is an escaped `$`; an unknown reference
  stays as written. An env value may reference variables defined before it in the list.
- The process's environment is the image's ENV overridden by the container's env.
- The user is `runAsUser`/`runAsGroup` of the container's securityContext, else the pod's, else
  the image's USER; `fsGroup` and `supplementalGroups` become supplementary groups; with
  `runAsNonRoot` a container that would run as root (or as a non-numeric image user) is refused
  with CreateContainerConfigError, as the kubelet does.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

# What the official python:3.11-slim image (the Dockerfile's default base) configures; the
# Debian-made base of containers/build-images.sh is imported with the same PATH and CMD.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerConfigError(Exception):
    """What the kubelet reports as a waiting container's reason: CreateContainerConfigError (a
    Secret or key missing), ErrImagePull (no such image)."""

    def __init__(self, message: str, reason: str = "CreateContainerConfigError"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI image configuration that decide the container's process."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = ""  # "", "uid", "uid:gid" or a name


PYTHON_BASE = ImageConfig(cmd=("python3",), env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"})


def _logical_lines(text: str) -> list[str]:
    """Dockerfile lines with continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current.strip():
        lines.append(current)
    return lines


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _substitute(text: str, variables: Mapping[str, str]) -> str:
    return _VAR.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def _command_form(value: str) -> tuple[str, ...]:
    """Exec form (a JSON array) as given; shell form through /bin/sh -c."""
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed):
            return tuple(parsed)
    return ("/bin/sh", "-c", value)


def image_config(dockerfile: Path, target: str, base: ImageConfig = PYTHON_BASE) -> ImageConfig:
    """The configuration the builder records for `target`; a FROM that names no earlier stage of
    the file (the Python base image) starts from `base`."""
    stages: dict[str, ImageConfig] = {}
    config: Optional[ImageConfig] = None
    name: Optional[str] = None  # of the stage being read
    cmd_inherited = False
    variables: dict[str, str] = {}
    for line in _logical_lines(dockerfile.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            parent = words[0]
            config = stages.get(parent, base)
            cmd_inherited = bool(config.cmd)
            if len(words) == 3 and words[1].upper() == "AS":
                stages[words[2]] = config
            variables = dict(config.env)
            name = words[2] if len(words) == 3 else None
        elif config is None:
            continue  # global ARGs before the first FROM
        elif keyword == "ENV":
            env = dict(config.env)
            if "=" in rest.split()[0]:
                for token in shlex.split(rest):
                    key, _, value = token.partition("=")
                    env[key] = _substitute(value, {**variables, **env})
            else:
                key, _, value = rest.partition(" ")
                env[key] = _substitute(value.strip(), {**variables, **env})
            config = replace(config, env=env)
            variables.update(env)
        elif keyword == "ARG":
            key, _, default = rest.partition("=")
            variables.setdefault(key, default.strip('"'))
        elif keyword == "WORKDIR":
            workdir = _substitute(rest, variables)
            config = replace(config, workdir=str(Path(config.workdir) / workdir))
        elif keyword == "USER":
            config = replace(config, user=_substitute(rest, variables))
        elif keyword == "ENTRYPOINT":
            config = replace(config, entrypoint=_command_form(rest), cmd=() if cmd_inherited else config.cmd)
        elif keyword == "CMD":
            config = replace(config, cmd=_command_form(rest))
            cmd_inherited = False
        if name is not None:
            stages[name] = config
    if target not in stages:
        raise KeyError(f"{dockerfile} has no build target {target!r} (targets: {', '.join(stages)})")
    return stages[target]


# --- Kubernetes ------------------------------------------------------------------------------------

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known references replaced, unknown ones kept, $$ -> $."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(one, text)


def process_argv(image: ImageConfig, container: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str, ...]:
    """The process's argv: Kubernetes' command/args rules over the image's ENTRYPOINT/CMD, then
    $(VAR) expansion of command and args (not of what comes from the image)."""
    command = [expand(c, env) for c in container.get("command") or []]
    args = [expand(a, env) for a in container.get("args") or []]
    if command:
        return (*command, *args)  # the image's CMD is ignored once command is set
    if args:
        return (*image.entrypoint, *args)
    return (*image.entrypoint, *image.cmd)


_FIELD_ANNOTATION = re.compile(r"metadata\.(annotations|labels)\['([^']+)'\]")


def field_value(pod: Mapping[str, Any], path: str) -> str:
    meta = pod.get("metadata", {})
    if path in ("metadata.name", "metadata.namespace", "metadata.uid"):
        return str(meta.get(path.split(".", 1)[1], ""))
    match = _FIELD_ANNOTATION.fullmatch(path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    if path == "spec.serviceAccountName":
        return str(pod.get("spec", {}).get("serviceAccountName", "default"))
    raise ContainerConfigError(f"unsupported fieldRef {path!r}")


def container_env(pod: Mapping[str, Any], container: Mapping[str, Any],
                  secret_value: Callable[[str, str], Optional[str]]) -> dict[str, str]:
    """The env the kubelet gives the container (what the pod spec defines, in order, each value
    expanded against the variables before it). `secret_value(name, key)` is None when absent."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        name = var["name"]
        source = var.get("valueFrom")
        if source is None:
            env[name] = expand(var.get("value", ""), env)
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = secret_value(ref["name"], ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f'secret "{ref["name"]}" has no key "{ref["key"]}" (or does not exist)')
            env[name] = value
        elif "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"]["fieldPath"])
        else:
            raise ContainerConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
    return env


@dataclass(frozen=True)
class Identity:
    uid: Optional[int]  # None: the image's user is a name (resolved inside the image)
    gid: Optional[int]
    groups: tuple[int, ...]
    user: str  # as a runtime's --user takes it


def process_identity(image: ImageConfig, pod: Mapping[str, Any], container: Mapping[str, Any]) -> Identity:
    pod_ctx = pod.get("spec", {}).get("securityContext") or {}
    ctx = container.get("securityContext") or {}

    def setting(key: str) -> Any:
        return ctx.get(key, pod_ctx.get(key))

    image_user, _, image_group = image.user.partition(":")
    uid: Optional[int] = setting("runAsUser")
    if uid is None:
        uid = int(image_user) if image_user.isdigit() else (0 if not image_user else None)
    gid: Optional[int] = setting("runAsGroup")
    if gid is None and image_group.isdigit():
        gid = int(image_group)
    if setting("runAsNonRoot"):
        if uid is None:
            raise ContainerConfigError(f"image has non-numeric user ({image_user}), cannot verify user is non-root")
        if uid == 0:
            raise ContainerConfigError("container has runAsNonRoot and image will run as root")
    groups = tuple(pod_ctx.get("supplementalGroups") or ()) + \
        ((pod_ctx["fsGroup"],) if pod_ctx.get("fsGroup") is not None else ())
    user = (str(uid) if uid is not None else image_user) + (f":{gid}" if gid is not None else "")
    return Identity(uid=uid, gid=gid, groups=groups, user=user)


@dataclass(frozen=True)
class Process:
    """What the runtime starts: argv, its environment, working directory and identity."""

    argv: tuple[str, ...]
    env: Mapping[str, str]  # the image's ENV overridden by the container's
    pod_env: Mapping[str, str]  # only what the pod spec defines (what a runtime is handed)
    workdir: str
    identity: Identity


def container_process(image: ImageConfig, pod: Mapping[str, Any], container: Mapping[str, Any],
                      secret_value: Callable[[str, str], Optional[str]]) -> Process:
    pod_env = container_env(pod, container, secret_value)
    return Process(argv=process_argv(image, container, pod_env), env={**image.env, **pod_env}, pod_env=pod_env,
                   workdir=container.get("workingDir") or image.workdir,
                   identity=process_identity(image, pod, container))
