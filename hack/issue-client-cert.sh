#!/usr/bin/env bash
# Issue kap's client certificate for static-pod mode through a Kubernetes
# CertificateSigningRequest. See --help.
set -euo pipefail

readonly PROG=${0##*/}
readonly SIGNER=kubernetes.io/kube-apiserver-client

out_dir=/etc/kubernetes/kap
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

usage() {
    cat <<EOF
Usage: $PROG [options]

Issue the client certificate kap uses in static-pod mode (deploy/static-pod.yaml)
and write it as apl.crt and apl.key (mode 0600) into the output directory.

Steps: make an EC P-256 key and a CSR with CN=<user> and O=<group>; create a
CertificateSigningRequest for the $SIGNER signer; approve it
(unless --no-approve); wait for the certificate; check it; move both files into
place. The key is written only together with its certificate: on any failure
the existing files are left as they were.

Idempotent: when apl.crt and apl.key exist, match, carry the same user and
group, and the certificate is valid for more than --renew-before days, nothing
is done and the exit status is 0.

deploy/rbac.yaml binds the default user and group; if you change them, change
its subjects too.

Options:
  --out-dir DIR           where apl.crt and apl.key go (default: $out_dir)
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
    printf '%s: %s\n' "$PROG" "$*" >&2
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
        --out-dir | --cn | --group | --kubectl | --kubeconfig | --timeout | --renew-before | \
            --expiration-seconds | --name)
            need_value "$@"
            case $1 in
                --out-dir) out_dir=$2 ;;
                --cn) cn=$2 ;;
                --group) group=$2 ;;
                --kubectl) kubectl_bin=$2 ;;
                --kubeconfig) kubeconfig=$2 ;;
                --timeout) timeout=$2 ;;
                --renew-before) renew_before_days=$2 ;;
                --expiration-seconds) expiration_seconds=$2 ;;
                --name) csr_name=$2 ;;
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
        *)
            usage_error "unknown argument: $1"
            ;;
    esac
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

readonly crt="$out_dir/apl.crt" key="$out_dir/apl.key"

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

if valid_pair "$crt" "$key" $((renew_before_days * 86400)); then
    info "$crt is valid for more than $renew_before_days days; nothing to do"
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

mkdir -p "$out_dir"
umask 077
work=$(mktemp -d "$out_dir/.apl.XXXXXX")
csr_created=0
cleanup() {
    local status=$?
    rm -rf "$work"
    if [[ $status -ne 0 && $csr_created -eq 1 ]]; then
        # Its key is gone: the request can never be used. Best effort.
        kube delete certificatesigningrequest "$csr_name" --ignore-not-found >/dev/null 2>&1 || true
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/apl.key" 2>/dev/null ||
    die "openssl could not make a key"
openssl req -new -key "$work/apl.key" -subj "/O=$group/CN=$cn" -out "$work/apl.csr" 2>/dev/null ||
    die "openssl could not make a certificate signing request"

request=$(base64 <"$work/apl.csr" | tr -d '\n')
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

printf '%s' "$certificate" | base64 -d >"$work/apl.crt" 2>/dev/null ||
    die "the certificate of $csr_name is not valid base64"
valid_pair "$work/apl.crt" "$work/apl.key" 0 ||
    die "the certificate issued for $csr_name does not match the key, the CN/O or is expired" \
        "inspect it with: kubectl get csr $csr_name -o jsonpath='{.status.certificate}' | base64 -d | openssl x509 -text"
chmod 0600 "$work/apl.crt" "$work/apl.key"

replacing=0
if [[ -e $crt || -e $key ]]; then
    replacing=1
fi
# Certificate first, then its key: a key never sits in place without its
# certificate. Both renames stay within one directory, so each is atomic.
mv -f "$work/apl.crt" "$crt"
mv -f "$work/apl.key" "$key"
info "wrote $crt and $key, valid until $(openssl x509 -in "$crt" -noout -enddate | cut -d= -f2)"
if [[ $replacing -eq 1 ]]; then
    # The static pod mounts the files themselves; a bind mount keeps the old
    # inode until the container is recreated.
    info "restart kap to use the new certificate:" \
        "crictl stop \$(crictl ps -q --name kubernetes-api-proxy)"
fi
