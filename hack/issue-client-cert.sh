#!/usr/bin/env bash
# Issue kap's client certificate for static-pod mode through a Kubernetes
# CertificateSigningRequest. See --help.
set -euo pipefail

readonly PROG=${0##*/}
readonly SIGNER=kubernetes.io/kube-apiserver-client

out_dir=/etc/kubernetes/kap
ca_file=/etc/kubernetes/pki/ca.crt
cn=system:kubernetes-api-proxy
group=system:kubernetes-api-proxies
kubectl_bin=${KUBECTL:-kubectl}
kubeconfig=
approve=1
timeout=300
renew_before_days=30
expiration_seconds=
csr_name=
poll_interval=${KAP_CSR_POLL_INTERVAL:-1}
quiet=0
from_dir=

usage() {
    cat <<EOF
Usage: $PROG [options]

Issue the client certificate kap uses in static-pod mode (deploy/static-pod.yaml)
and write it, with the cluster CA, into the output directory as kap reads them:
ca.crt (a copy of --ca-file), cl.crt and cl.key (mode 0600). The static pod
mounts that directory, so a renewal reaches the running kap at its next
connection, without a restart.

Steps: make an EC P-256 key and a CSR with CN=<user> and O=<group>; create a
CertificateSigningRequest for the $SIGNER signer; approve it
(unless --no-approve); wait for the certificate; check it; put the three files
in place at once. They are written into a new subdirectory, and the ..data
link then switches to it with one rename (ca.crt, cl.crt and cl.key are links
through ..data, as in Kubernetes Secret volumes): kap never sees a certificate
with another key, or a half-written file. On any failure the existing files
are left as they were.

Idempotent: when cl.crt and cl.key exist, match, carry the same user and
group, and the certificate is valid for more than --renew-before days, no
certificate is requested and the exit status is 0; ca.crt is still refreshed
when --ca-file changed. So it can run daily from cron or a systemd timer
(with --quiet, it prints nothing unless it fails).

deploy/rbac.yaml binds the default user and group; if you change them, change
its subjects too.

Options:
  --out-dir DIR           where ca.crt, cl.crt and cl.key go (default: $out_dir)
  --ca-file FILE          the cluster CA certificate, copied to ca.crt
                          (default: $ca_file)
  --cn NAME               user name, the certificate's CN (default: $cn)
  --group NAME            group, the certificate's O (default: $group)
  --kubectl PATH          kubectl binary (default: \$KUBECTL or kubectl)
  --kubeconfig FILE       kubeconfig for kubectl (default: kubectl's own choice)
  --no-approve            do not approve the CSR; wait for someone or something
                          else to (for clusters that approve CSRs elsewhere)
  --timeout SECONDS       how long to wait for the certificate (default: $timeout)
  --renew-before DAYS     reissue when the certificate expires within DAYS
                          (default: $renew_before_days)
  --expiration-seconds N  requested lifetime (spec.expirationSeconds, at least
                          600; default: the signer's, one year with kubeadm)
  --name NAME             CertificateSigningRequest name
                          (default: kap-<hostname>-<unix time>)
  --from DIR              install DIR/cl.crt and DIR/cl.key, made by this script
                          elsewhere (for nodes without cluster access), instead of
                          requesting a certificate
  -q, --quiet             print errors only (for cron)
  -h, --help              show this help

Exit status: 0 issued or nothing to do, 1 failed (the message says what to do),
2 bad usage.
EOF
}

die() {
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    shift
    local hint
    for hint in "$@"; do
        printf '%s: hint: %s\n' "$PROG" "$hint" >&2
    done
    exit 1
}

usage_error() {
    printf '%s: %s (see --help)\n' "$PROG" "$1" >&2
    exit 2
}

info() {
    if [[ $quiet -eq 0 ]]; then
        printf '%s: %s\n' "$PROG" "$*" >&2
    fi
}

need_value() {
    [[ $# -ge 2 && -n $2 ]] || usage_error "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --out-dir | --ca-file | --cn | --group | --kubectl | --kubeconfig | --timeout | \
            --renew-before | --expiration-seconds | --name | --from)
            need_value "$@"
            case $1 in
                --out-dir) out_dir=$2 ;;
                --ca-file) ca_file=$2 ;;
                --cn) cn=$2 ;;
                --group) group=$2 ;;
                --kubectl) kubectl_bin=$2 ;;
                --kubeconfig) kubeconfig=$2 ;;
                --timeout) timeout=$2 ;;
                --renew-before) renew_before_days=$2 ;;
                --expiration-seconds) expiration_seconds=$2 ;;
                --name) csr_name=$2 ;;
                --from) from_dir=$2 ;;
            esac
            shift 2
            ;;
        --*=*)
            # --flag=value: split and go round again.
            set -- "${1%%=*}" "${1#*=}" "${@:2}"
            ;;
        --no-approve)
            approve=0
            shift
            ;;
        -q | --quiet)
            quiet=1
            shift
            ;;
        *)
            usage_error "unknown argument: $1"
            ;;
    esac
done

# The directory is built next to its place: no trailing slash.
while [[ $out_dir == */ && $out_dir != / ]]; do
    out_dir=${out_dir%/}
done
[[ $timeout =~ ^[1-9][0-9]*$ ]] || usage_error "--timeout must be a whole number of seconds"
[[ $renew_before_days =~ ^[0-9]+$ ]] || usage_error "--renew-before must be a whole number of days"
if [[ -n $expiration_seconds ]]; then
    [[ $expiration_seconds =~ ^[0-9]+$ && $expiration_seconds -ge 600 ]] ||
        usage_error "--expiration-seconds must be a number of seconds, at least 600"
fi
# Names go into an openssl -subj string and a Kubernetes object name.
name_re='^[A-Za-z0-9][A-Za-z0-9:._@-]*$'
[[ $cn =~ $name_re ]] || usage_error "--cn may hold letters, digits and : . _ @ - only"
[[ $group =~ $name_re ]] || usage_error "--group may hold letters, digits and : . _ @ - only"
if [[ -z $csr_name ]]; then
    host=$(hostname 2>/dev/null || echo node)
    host=$(printf '%s' "$host" | tr 'A-Z_' 'a-z-' | tr -cd 'a-z0-9.-')
    csr_name="kap-${host:-node}-$(date +%s)"
fi
[[ $csr_name =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]] ||
    usage_error "--name must be a lower-case DNS subdomain name"

command -v openssl >/dev/null || die "openssl not found" "install openssl (Debian/Ubuntu: apt-get install openssl)"

readonly crt="$out_dir/cl.crt" key="$out_dir/cl.key" ca="$out_dir/ca.crt"
# What versions before the directory mount wrote; adopted once when still valid.
readonly legacy_crt="$out_dir/apl.crt" legacy_key="$out_dir/apl.key"

# The cluster CA: checked first, so a wrong path fails before any request.
if ! openssl x509 -in "$ca_file" -noout 2>/dev/null; then
    die "cannot read the cluster CA certificate $ca_file" \
        "pass --ca-file with the CA that signed the apiserver certificates (kubeadm: /etc/kubernetes/pki/ca.crt)"
fi

# valid_pair CERT KEY SECONDS: the pair exists, matches, names our user and
# group, and the certificate is valid for more than SECONDS.
valid_pair() {
    local cert=$1 pkey=$2 seconds=$3 subject
    [[ -s $cert && -s $pkey ]] || return 1
    openssl x509 -in "$cert" -noout -checkend "$seconds" >/dev/null 2>&1 || return 1
    [[ "$(openssl x509 -in "$cert" -noout -pubkey 2>/dev/null)" == \
        "$(openssl pkey -in "$pkey" -pubout 2>/dev/null)" ]] || return 1
    subject=$(openssl x509 -in "$cert" -noout -subject -nameopt RFC2253 2>/dev/null) || return 1
    [[ ",${subject#subject=}," == *",CN=$cn,"* && ",${subject#subject=}," == *",O=$group,"* ]]
}

# $out_dir itself is made only by publish, complete: the static pod waits for
# it, and a kap started on an empty one would run without the CA.
parent=$(dirname -- "$out_dir")
mkdir -p "$parent"
# One run at a time: two runs switching ..data and pruning versions could
# remove each other's files. The lock is on the parent (a directory fd, no file).
if command -v flock >/dev/null; then
    exec 9<"$parent"
    flock -n 9 || die "another $PROG is running on $parent" "let it finish, then rerun"
fi
umask 077

work=
version=
staging=
csr_created=0
cleanup() {
    local status=$?
    if [[ -n $work ]]; then
        rm -rf "$work"
    fi
    if [[ -n $version ]]; then
        # Interrupted before ..data pointed at it: never in use.
        rm -rf "$version"
    fi
    if [[ -n $staging ]]; then
        rm -rf "$staging"
    fi
    rm -f "$out_dir/..data.tmp" "$out_dir/.ca.crt.tmp" "$out_dir/.cl.crt.tmp" "$out_dir/.cl.key.tmp"
    if [[ $status -ne 0 && $csr_created -eq 1 ]]; then
        # Its key is gone: the request can never be used. Best effort.
        kube delete certificatesigningrequest "$csr_name" --ignore-not-found >/dev/null 2>&1 || true
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# publish CA CERT KEY: make copies of these the ca.crt, cl.crt and cl.key of
# $out_dir, all three in one step.
#
# kap re-reads its files when a stat of any of them changes, and the static
# pod mounts $out_dir itself (a file mount would pin the old inode). Writing
# the files one by one, even each by rename, would let kap see the new
# certificate with the old key. So the three go into a new subdirectory
# ..<time>.XXXXXX, the symbolic link ..data is switched to it by one rename,
# and ca.crt, cl.crt and cl.key are links to ..data/<name> (the layout of
# Kubernetes' Secret and ConfigMap volumes, which kap reads the same way).
#
# The first time, the whole directory is built next to its place and renamed
# in, so it never exists without the three files.
publish() {
    local dir=$out_dir name old current
    if [[ ! -d $out_dir ]]; then
        staging=$(mktemp -d "$out_dir.XXXXXX")
        chmod 0755 "$staging"
        dir=$staging
    fi
    version=$(mktemp -d "$dir/..$(date -u +%Y_%m_%d_%H_%M_%S).XXXXXX")
    chmod 0755 "$version"
    cp "$1" "$version/ca.crt"
    cp "$2" "$version/cl.crt"
    cp "$3" "$version/cl.key"
    chmod 0644 "$version/ca.crt"
    chmod 0600 "$version/cl.crt" "$version/cl.key"
    current=${version##*/}
    ln -sfn "$current" "$dir/..data.tmp"
    mv -T "$dir/..data.tmp" "$dir/..data"
    version=
    # The key before its certificate: only on a first run or from plain files
    # (later runs find these links in place).
    for name in ca.crt cl.key cl.crt; do
        if [[ "$(readlink "$dir/$name" || true)" != "..data/$name" ]]; then
            ln -sfn "..data/$name" "$dir/.$name.tmp"
            mv -T "$dir/.$name.tmp" "$dir/$name"
        fi
    done
    # Earlier versions: nothing points at them any more.
    for old in "$dir"/..?*; do
        if [[ -d $old && ! -L $old && ${old##*/} != "$current" ]]; then
            rm -rf -- "$old"
        fi
    done
    if [[ -n $staging ]]; then
        mv -T "$staging" "$out_dir"
        staging=
    fi
}

if [[ -n $from_dir ]]; then
    valid_pair "$from_dir/cl.crt" "$from_dir/cl.key" 0 ||
        die "$from_dir/cl.crt and cl.key are not a matching, unexpired pair for CN=$cn, O=$group" \
            "make them with $PROG --out-dir DIR on a machine with cluster access"
    if cmp -s "$from_dir/cl.crt" "$crt" && cmp -s "$from_dir/cl.key" "$key" && cmp -s "$ca_file" "$ca"; then
        info "$crt is already the certificate in $from_dir; nothing to do"
        exit 0
    fi
    publish "$ca_file" "$from_dir/cl.crt" "$from_dir/cl.key"
    info "installed $from_dir/cl.crt and cl.key as $crt and $key;" \
        "kap uses them from its next connection"
    exit 0
fi

have_crt=$crt have_key=$key
if [[ ! -e $crt && ! -e $key && -e $legacy_crt ]]; then
    have_crt=$legacy_crt have_key=$legacy_key
fi
if valid_pair "$have_crt" "$have_key" $((renew_before_days * 86400)); then
    if [[ $have_crt == "$crt" ]] && cmp -s "$ca_file" "$ca"; then
        info "$crt is valid for more than $renew_before_days days; nothing to do"
        exit 0
    fi
    publish "$ca_file" "$have_crt" "$have_key"
    if [[ $have_crt == "$legacy_crt" ]]; then
        info "copied $legacy_crt and $legacy_key to $crt and $key;" \
            "delete the apl.* files once the static pod mounts $out_dir"
    else
        info "updated $ca from $ca_file"
    fi
    exit 0
fi

command -v "$kubectl_bin" >/dev/null ||
    die "kubectl not found ($kubectl_bin)" "install kubectl or pass --kubectl PATH"

kubectl_args=(--request-timeout=30s)
if [[ -n $kubeconfig ]]; then
    kubectl_args+=(--kubeconfig "$kubeconfig")
fi
kube() {
    "$kubectl_bin" "${kubectl_args[@]}" "$@"
}

if ! access=$(kube auth can-i create certificatesigningrequests.certificates.k8s.io 2>&1); then
    die "cannot create CertificateSigningRequests: ${access:-no answer from kubectl}" \
        "check that the cluster is reachable and that your credentials may create CSRs" \
        "on a kubeadm control-plane node: --kubeconfig /etc/kubernetes/admin.conf"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/kap-csr.XXXXXX")

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/cl.key" 2>/dev/null ||
    die "openssl could not make a key"
openssl req -new -key "$work/cl.key" -subj "/O=$group/CN=$cn" -out "$work/cl.csr" 2>/dev/null ||
    die "openssl could not make a certificate signing request"

request=$(base64 <"$work/cl.csr" | tr -d '\n')
{
    cat <<EOF
apiVersion: certificates.k8s.io/v1
kind: CertificateSigningRequest
metadata:
  name: $csr_name
  labels:
    app.kubernetes.io/name: kubernetes-api-proxy
spec:
  signerName: $SIGNER
  usages: ["digital signature", "client auth"]
  request: $request
EOF
    if [[ -n $expiration_seconds ]]; then
        echo "  expirationSeconds: $expiration_seconds"
    fi
} >"$work/csr.yaml"

if ! created=$(kube create -f - <"$work/csr.yaml" 2>&1); then
    die "could not create CertificateSigningRequest $csr_name: $created" \
        "check cluster access, or pass another --name if one with this name exists"
fi
csr_created=1
info "created CertificateSigningRequest $csr_name (CN=$cn, O=$group)"

if [[ $approve -eq 1 ]]; then
    if ! approved=$(kube certificate approve "$csr_name" 2>&1); then
        die "could not approve $csr_name: $approved" \
            "approve it with an identity allowed to (approve on signers/$SIGNER), or" \
            "rerun with --no-approve where CSRs are approved by someone else"
    fi
    info "approved $csr_name"
fi

deadline=$((SECONDS + timeout))
certificate=
while :; do
    conditions=$(kube get certificatesigningrequest "$csr_name" \
        -o 'jsonpath={.status.conditions[*].type}' 2>/dev/null) || conditions=
    case " $conditions " in
        *" Denied "* | *" Failed "*)
            why=$(kube get certificatesigningrequest "$csr_name" \
                -o 'jsonpath={.status.conditions[*].message}' 2>/dev/null) || why=
            die "CertificateSigningRequest $csr_name was ${conditions// /, }: ${why:-no message}" \
                "ask the cluster administrator why, fix that, and rerun $PROG"
            ;;
    esac
    certificate=$(kube get certificatesigningrequest "$csr_name" \
        -o 'jsonpath={.status.certificate}' 2>/dev/null) || certificate=
    [[ -n $certificate ]] && break
    if ((SECONDS >= deadline)); then
        if [[ $approve -eq 1 ]]; then
            hint="check that kube-controller-manager signs $SIGNER (--cluster-signing-cert-file)"
        else
            hint="approve new CSRs within --timeout (kubectl certificate approve), or drop --no-approve"
        fi
        die "no certificate for $csr_name after ${timeout}s" "$hint" \
            "then rerun $PROG (with a larger --timeout if the signer is slow)"
    fi
    sleep "$poll_interval"
done

printf '%s' "$certificate" | base64 -d >"$work/cl.crt" 2>/dev/null ||
    die "the certificate of $csr_name is not valid base64"
valid_pair "$work/cl.crt" "$work/cl.key" 0 ||
    die "the certificate issued for $csr_name does not match the key, the CN/O or is expired" \
        "inspect it with: kubectl get csr $csr_name -o jsonpath='{.status.certificate}' | base64 -d | openssl x509 -text"

publish "$ca_file" "$work/cl.crt" "$work/cl.key"
info "wrote $crt and $key, valid until $(openssl x509 -in "$crt" -noout -enddate | cut -d= -f2);" \
    "kap uses them from its next connection"
