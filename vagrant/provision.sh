#!/usr/bin/env bash
# The test VM's provisioner (vagrant/Vagrantfile), as root in the guest, in the synced checkout:
# install the package and what its tests need, run the demo, then the tests. pytest's summary
# line is the last line it prints. AZWI_PYTEST_ARGS replaces the default selection below.
#
# AZWI_OFFLINE=1 (the local box): everything comes with the box (Debian's packages) or the
# synced folder (vagrant/wheelhouse, built on the host by vagrant/wheelhouse.sh); pip reaches no
# index. Otherwise (a public box, whose guest is online) scripts/bootstrap.sh installs it all.
set -euo pipefail
umask 022
cd /vagrant

# The default: the redirect in real namespaces with both backends (traffic lands where the rules
# say, fail closed, install/check/cleanup), the whole pod through the redirect for each backend
# (the sidecar's token, fail closed with the proxy down, another pod kept out), and the
# metadata address closed to other uids on every port. About N minutes under TCG (README).
DEFAULT_TESTS=(
    "tests/test_init_netns.py::test_traffic_lands_where_the_rules_say"
    "tests/test_pod_netns.py::test_curl_gets_the_pods_token_through_the_proxy"
    "tests/test_pod_netns.py::test_with_the_proxy_down_nothing_reaches_imds"
    "tests/test_pod_netns.py::test_another_pod_cannot_reach_the_proxy"
    "tests/test_security.py::test_other_uids_cannot_reach_the_metadata_address_on_any_port"
)

started=$SECONDS
if [[ "${AZWI_OFFLINE:-0}" == 1 ]]; then
    VENV=/opt/azwi-netproxy/venv
    WHEELHOUSE=/vagrant/vagrant/wheelhouse
    if ! compgen -G "$WHEELHOUSE/azwi_netproxy-*.whl" >/dev/null || [[ ! -f "$WHEELHOUSE/requirements.txt" ]]; then
        echo "provision: no wheelhouse in $WHEELHOUSE: run vagrant/wheelhouse.sh on the host, then vagrant rsync" >&2
        exit 2
    fi
    echo "provision: installing from the wheelhouse (offline)" >&2
    # A fresh venv each time, filled by one pip run: under an emulated CPU each pip run costs
    # about 25 s before it installs anything, and one that finds everything installed already
    # is slower than one that installs it all again. Debian's pip (its bytecode compiled by
    # Debian), run for the venv, starts faster than one the venv would first have to compile.
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    /usr/bin/python3 -m venv --without-pip "$VENV"
    /usr/bin/python3 -m pip --python "$VENV/bin/python" install --quiet --no-compile --no-index \
        --find-links "$WHEELHOUSE" --requirement "$WHEELHOUSE/requirements.txt" "$WHEELHOUSE"/azwi_netproxy-*.whl
    # Bytecode for the package and what it needs at run time, which the tests run as other uids
    # (the proxy as 1501) and so cannot cache; the test tools, imported as root, cache their own.
    "$VENV/bin/python" - <<'PY' | "$VENV/bin/python" -m compileall -q -j 0 -i - >/dev/null || true
import importlib.metadata as metadata
import re

todo, seen = ["azwi-netproxy"], set()
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen:
        continue
    seen.add(name)
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:  # a requirement for other Pythons
        continue
    for path in dist.files or []:
        if path.suffix == ".py":
            print(dist.locate_file(path))
    todo += [re.match(r"[A-Za-z0-9._-]+", req)[0] for req in dist.requires or [] if "extra ==" not in req]
PY
    # The tests run the proxy as uid 1501 and clients as uid 1000 from this venv.
    chmod -R a+rX "$VENV"
else
    VENV="$(AZWI_WITH_TESTS=1 bash scripts/bootstrap.sh | tail -n 1)"
fi
echo "provision: installed in $((SECONDS - started)) s" >&2

echo "provision: the demo" >&2
started=$SECONDS
demo=0
"$VENV/bin/azwi-netproxy-demo" || demo=$?
echo "provision: the demo exited $demo after $((SECONDS - started)) s" >&2

if [[ -n "${AZWI_PYTEST_ARGS:-}" ]]; then
    # Word splitting of the extra arguments is intended.
    # shellcheck disable=SC2206
    tests=($AZWI_PYTEST_ARGS)
else
    tests=("${DEFAULT_TESTS[@]}")
fi
# The pytest script (not `python -m pytest`) keeps the checkout off sys.path (scripts/test.sh).
tested=0
"$VENV/bin/pytest" -p no:cacheprovider "${tests[@]}" || tested=$?
if ((demo != 0)); then
    exit "$demo"
fi
exit "$tested"
