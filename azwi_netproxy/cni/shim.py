"""The plugin as the node sees it: a POSIX shell script that hands the call to the agent.

Pure: `render` returns the script's text; the agent writes it into the CNI bin dir.

Why a shim: the runtime runs plugins in the host's mount namespace, where neither Python
nor our libraries are installed; the agent's container has both. So the shim:
1. finds the agent by its state file (host PID and the process's start time, field 22 of
   /proc/PID/stat) and proves that PID is still the agent: a reused PID could be any
   process, and entering its mount namespace would run whatever file it has at our
   interpreter's path, as root;
2. opens CNI_NETNS, which exists only in the runtime's mount namespace, as descriptor 3;
3. enters the agent's mount namespace and root with nsenter (util-linux, on every node)
   and runs `python -I -m azwi_netproxy.cni` there, stdin and CNI_ variables unchanged.
Without a live agent, a pod whose configuration names our redirect or node-proxy annotation
(other than with the exact value "false") fails ADD and CHECK with code 11 (try again later: the runtime
retries the sandbox), so none starts without the rules it asked for; any other pod gets
prevResult handed on, cut out of stdin by a small JSON scanner in awk (POSIX, on every
node), so the node's other pods do not depend on our agent; DEL always succeeds (the
namespace is being torn down anyway).
"""

from __future__ import annotations

import json
import os
import shlex

from azwi_netproxy.cni.spec import SUPPORTED_VERSIONS, TRY_AGAIN_LATER, version_body

_TEMPLATE = r"""#!/bin/sh
# azwi-netproxy's CNI plugin on this node, written by azwi-netproxy-cni-agent, which
# rewrites it: do not edit. It runs the plugin inside the agent's container (see
# azwi_netproxy/cni/shim.py in the project for why and how).
set -u
STATE=@STATE@
PYTHON=@PYTHON@
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

# Prints the top-level "prevResult" of the JSON object on stdin (or, if it has none, a
# result with its "cniVersion"); exits 1 if it finds neither.
PREV_RESULT='
{ text = text $0 "\n" }
END {
    n = length(text); depth = 0; instr = 0; esc = 0; wantkey = 0; iskey = 0
    key = ""; version = ""; start = 0; stop = 0
    for (i = 1; i <= n; i++) {
        c = substr(text, i, 1)
        if (instr) {
            if (esc) esc = 0
            else if (c == "\\") esc = 1
            else if (c == "\"") {
                instr = 0
                word = substr(text, from + 1, i - from - 1)
                if (iskey) key = word
                else if (depth == 1 && key == "cniVersion") version = word
            }
            continue
        }
        if (c == "\"") { instr = 1; from = i; iskey = (depth == 1 && wantkey); continue }
        if (c == "{" || c == "[") {
            if (depth == 1 && key == "prevResult" && c == "{" && !start) start = i
            depth++
            if (depth == 1) wantkey = 1
            continue
        }
        if (c == "}" || c == "]") {
            depth--
            if (start && !stop && depth == 1) stop = i
            continue
        }
        if (depth == 1 && c == ":") wantkey = 0
        if (depth == 1 && c == ",") wantkey = 1
    }
    if (start && stop) print substr(text, start, stop - start + 1)
    else if (version != "") printf "{\"cniVersion\":\"%s\"}\n", version
    else exit 1
}'

fail() {
    printf '{"cniVersion":"@VERSION@","code":@CODE@,"msg":"%s","details":"%s"}\n' "$1" "$2"
    exit 1
}

agent_pid() {
    [ -f "$STATE" ] && [ -O "$STATE" ] || return 1
    read -r pid start < "$STATE" || return 1
    case "$pid$start" in '' | *[!0-9]*) return 1 ;; esac
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    # Fields after the command name, which may itself hold spaces or parentheses.
    set -- ${stat##*) }
    [ "$#" -ge 20 ] && [ "${20}" = "$start" ] || return 1
    echo "$pid"
}

case "${CNI_COMMAND:-}" in
VERSION)
    echo '@VERSION_BODY@'
    exit 0
    ;;
esac

# Whether the configuration on stdin ($config) names the annotation azwi-netproxy.io/$1
# with any value but "false". JSON may escape the slash: those spellings count as asking
# too (never as not asking).
asks() {
    case "$config" in
    *'"azwi-netproxy.io/'"$1"'":"false"'*) return 1 ;;
    *'"azwi-netproxy.io/'"$1"'"'* | *'"azwi-netproxy.io\/'"$1"'"'* | \
        *'"azwi-netproxy.io\u002'[fF]"$1"'"'*) return 0 ;;
    esac
    return 1
}

if ! pid=$(agent_pid); then
    [ "${CNI_COMMAND:-}" = DEL ] && exit 0
    config=$(cat)
    if asks redirect || asks node-proxy; then
        fail "the azwi-netproxy CNI node agent is not running on this node" \
            "the pod asked for the redirect or node mode; the runtime retries once the agent runs again"
    fi
    [ "${CNI_COMMAND:-}" = ADD ] || exit 0
    printf '%s\n' "$config" | LC_ALL=C awk "$PREV_RESULT"
    exit
fi
# Where the plugin finds the node process (node mode): the agent's run dir, the host's path.
AZWI_CNI_RUN_DIR=@RUN_DIR@
export AZWI_CNI_RUN_DIR
if [ -n "${CNI_NETNS:-}" ] && [ -e "$CNI_NETNS" ]; then
    exec 3<"$CNI_NETNS"
    AZWI_CNI_NETNS_FD=3
    export AZWI_CNI_NETNS_FD
fi
# --root and --wd with no value: the agent's own root and working directory (the agent
# works in its root), both opened before entering, so neither leaves the container.
exec nsenter --target "$pid" --mount --root --wd -- "$PYTHON" -I -m azwi_netproxy.cni
"""


def render(*, state_file: str, python: str) -> str:
    """The shim for an agent that keeps its state in `state_file` (in its run dir) and runs `python`."""
    return (
        _TEMPLATE.replace("@STATE@", shlex.quote(state_file))
        .replace("@RUN_DIR@", shlex.quote(os.path.dirname(state_file)))
        .replace("@PYTHON@", shlex.quote(python))
        .replace("@VERSION_BODY@", json.dumps(version_body(), separators=(",", ":")))
        .replace("@VERSION@", SUPPORTED_VERSIONS[-1])
        .replace("@CODE@", str(TRY_AGAIN_LATER))
    )
