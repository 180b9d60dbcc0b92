/*
 * istio-init-cni: the host half of istio-init's CNI form.
 *
 * The container runtime runs this for every pod sandbox. It needs nothing from
 * the node but the kernel (a static executable: no Python, no shared
 * libraries, no iptables), because all the work happens in the node agent
 * (`istio-init cni-agent`, a DaemonSet pod): this program forwards the call --
 * the CNI_* variables, the network configuration from stdin, and the pod's
 * network namespace as an open descriptor (SCM_RIGHTS) -- over the agent's
 * Unix socket and prints the agent's answer with the agent's exit status.
 *
 * When the agent cannot be reached (not started yet, being upgraded): DEL
 * succeeds (a pod must always be deletable), ADD for a namespace the agent
 * excludes passes prevResult through (so the agent's own pod, in kube-system,
 * can start), and every other ADD fails with the CNI error "try again later",
 * which the kubelet retries. The excluded namespaces are the file
 * `excluded-namespaces` the agent keeps in its run directory.
 *
 * Wire format (request): "ISTIO-INIT-CNI/1\n" (carrying the descriptor when
 * there is one), then NAME=VALUE\0 for each CNI_* variable, an empty entry
 * (\0), then the network configuration until end of stream.
 * Reply: the exit status in decimal and "\n", then the answer for stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_RUN_DIR "/var/run/istio-init-cni"
#define SOCKET_NAME "agent.sock"
#define EXCLUDED_NAME "excluded-namespaces"
#define MAGIC "ISTIO-INIT-CNI/1\n"
#define MAX_CONF (16 * 1024 * 1024)
#define REPLY_TIMEOUT_SECONDS 150
#define ERR_TRY_AGAIN 11 /* CNI spec 1.1: "try again later" */
#define ERR_IO 5

static const char *const FORWARDED[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME",
                                        "CNI_ARGS", "CNI_PATH", NULL};

struct buf {
    char *data;
    size_t len, cap;
};

static int buf_add(struct buf *b, const char *data, size_t len) {
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len + 1) cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown) return -1;
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
    return 0;
}

static int read_all(int fd, struct buf *b, size_t limit) {
    char chunk[65536];
    for (;;) {
        ssize_t got = read(fd, chunk, sizeof chunk);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return -1;
        if (got == 0) return 0;
        if (b->len + (size_t)got > limit || buf_add(b, chunk, (size_t)got) < 0) return -1;
    }
}

static int write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t put = write(fd, data, len);
        if (put < 0 && errno == EINTR) continue;
        if (put <= 0) return -1;
        data += put;
        len -= (size_t)put;
    }
    return 0;
}

/* ---- just enough JSON to find a top-level member of the configuration ---- */

static size_t skip_ws(const char *s, size_t i, size_t n) {
    while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++;
    return i;
}

static size_t skip_string(const char *s, size_t i, size_t n) { /* s[i] == '"'; returns past the closing quote */
    for (i++; i < n; i++) {
        if (s[i] == '\\') i++;
        else if (s[i] == '"') return i + 1;
    }
    return n + 1;
}

static size_t skip_value(const char *s, size_t i, size_t n) {
    if (i >= n) return n + 1;
    if (s[i] == '"') return skip_string(s, i, n);
    if (s[i] == '{' || s[i] == '[') {
        int depth = 0;
        while (i < n) {
            if (s[i] == '"') { i = skip_string(s, i, n); continue; }
            if (s[i] == '{' || s[i] == '[') depth++;
            if (s[i] == '}' || s[i] == ']') {
                if (--depth == 0) return i + 1;
            }
            i++;
        }
        return n + 1;
    }
    while (i < n && !strchr(",}] \t\r\n", s[i])) i++;
    return i;
}

/* The raw text of the top-level member `key` of the object in s[0:n]: 0 and [*start, *end), or -1. */
static int json_member(const char *s, size_t n, const char *key, size_t *start, size_t *end) {
    size_t i = skip_ws(s, 0, n), klen = strlen(key);
    if (i >= n || s[i] != '{') return -1;
    i = skip_ws(s, i + 1, n);
    while (i < n && s[i] == '"') {
        size_t key_start = i + 1;
        i = skip_string(s, i, n);
        if (i > n) return -1;
        size_t key_end = i - 1;
        i = skip_ws(s, i, n);
        if (i >= n || s[i] != ':') return -1;
        i = skip_ws(s, i + 1, n);
        size_t value_start = i;
        i = skip_value(s, i, n);
        if (i > n) return -1;
        if (key_end - key_start == klen && memcmp(s + key_start, key, klen) == 0) {
            *start = value_start;
            *end = i;
            return 0;
        }
        i = skip_ws(s, i, n);
        if (i < n && s[i] == ',') i = skip_ws(s, i + 1, n);
    }
    return -1;
}

/* A top-level string member without escapes, copied into out; 0 on success. */
static int json_string_member(const char *s, size_t n, const char *key, char *out, size_t out_size) {
    size_t start, end;
    if (json_member(s, n, key, &start, &end) < 0 || end - start < 2 || s[start] != '"') return -1;
    size_t len = end - start - 2;
    if (len + 1 > out_size || memchr(s + start + 1, '\\', len)) return -1;
    memcpy(out, s + start + 1, len);
    out[len] = '\0';
    return 0;
}

/* ---- answers given without the agent ---- */

static void print_json_string(const char *text) {
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        if (*p == '"' || *p == '\\') printf("\\%c", *p);
        else if (*p < 0x20) printf("\\u%04x", *p);
        else putchar(*p);
    }
    putchar('"');
}

static int cni_error(const char *version, int code, const char *msg, const char *details) {
    printf("{\"cniVersion\":");
    print_json_string(version);
    printf(",\"code\":%d,\"msg\":", code);
    print_json_string(msg);
    printf(",\"details\":");
    print_json_string(details);
    printf("}\n");
    fflush(stdout);
    return 1;
}

static void pod_namespace(char *out, size_t size) {
    const char *args = getenv("CNI_ARGS");
    out[0] = '\0';
    for (const char *p = args; p && *p;) {
        const char *item_end = strchr(p, ';');
        size_t len = item_end ? (size_t)(item_end - p) : strlen(p);
        static const char key[] = "K8S_POD_NAMESPACE=";
        if (len >= sizeof key - 1 && memcmp(p, key, sizeof key - 1) == 0 && len - (sizeof key - 1) < size) {
            memcpy(out, p + sizeof key - 1, len - (sizeof key - 1));
            out[len - (sizeof key - 1)] = '\0';
            return;
        }
        p = item_end ? item_end + 1 : NULL;
    }
}

static int namespace_excluded(const char *run_dir, const char *namespace) {
    char path[4200], line[512];
    if (!namespace[0]) return 0;
    snprintf(path, sizeof path, "%s/%s", run_dir, EXCLUDED_NAME);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        found = strcmp(line, namespace) == 0;
    }
    fclose(f);
    return found;
}

static int without_agent(const char *command, const struct buf *conf, const char *version, const char *run_dir,
                         const char *why) {
    char namespace[256], details[4400];
    if (strcmp(command, "DEL") == 0 || strcmp(command, "GC") == 0) return 0;
    if (strcmp(command, "VERSION") == 0) {
        printf("{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]}\n");
        return 0;
    }
    pod_namespace(namespace, sizeof namespace);
    if (strcmp(command, "ADD") == 0 && namespace_excluded(run_dir, namespace)) {
        size_t start, end;
        if (json_member(conf->data, conf->len, "prevResult", &start, &end) == 0) {
            fwrite(conf->data + start, 1, end - start, stdout);
            putchar('\n');
            return 0;
        }
        printf("{\"cniVersion\":");
        print_json_string(version);
        printf("}\n");
        return 0;
    }
    snprintf(details, sizeof details, "%s; is the istio-init cni-agent DaemonSet pod running on this node?", why);
    return cni_error(version, ERR_TRY_AGAIN, "the istio-init CNI agent is not reachable", details);
}

/* ---- the call, forwarded ---- */

static int send_request(int sock, int netns_fd, const struct buf *conf) {
    struct buf head = {0};
    for (const char *const *name = FORWARDED; *name; name++) {
        const char *value = getenv(*name);
        if (!value) continue;
        if (buf_add(&head, *name, strlen(*name)) < 0 || buf_add(&head, "=", 1) < 0 ||
            buf_add(&head, value, strlen(value) + 1) < 0)
            return -1;
    }
    if (buf_add(&head, "", 1) < 0) return -1;

    struct iovec iov = {.iov_base = MAGIC, .iov_len = sizeof MAGIC - 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (netns_fd >= 0) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &netns_fd, sizeof(int));
    }
    ssize_t sent;
    do sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent != (ssize_t)(sizeof MAGIC - 1)) return -1;
    int failed = write_all(sock, head.data, head.len) < 0 || write_all(sock, conf->data, conf->len) < 0;
    free(head.data);
    if (failed) return -1;
    return shutdown(sock, SHUT_WR);
}

int main(void) {
    struct buf conf = {0};
    char version[64] = "1.0.0", run_dir[4096] = DEFAULT_RUN_DIR;
    const char *command = getenv("CNI_COMMAND");
    if (!command) command = "";
    signal(SIGPIPE, SIG_IGN); /* an agent that went away is an answer (EPIPE), not a silent death */

    if (read_all(0, &conf, MAX_CONF) < 0) return cni_error(version, ERR_IO, "cannot read the network configuration", "");
    if (buf_add(&conf, "", 0) < 0) return cni_error(version, ERR_IO, "out of memory", "");
    json_string_member(conf.data, conf.len, "cniVersion", version, sizeof version);
    json_string_member(conf.data, conf.len, "runDir", run_dir, sizeof run_dir);

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if ((size_t)snprintf(addr.sun_path, sizeof addr.sun_path, "%s/%s", run_dir, SOCKET_NAME) >= sizeof addr.sun_path)
        return cni_error(version, ERR_IO, "runDir is too long for a Unix socket path", run_dir);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        char why[4300];
        snprintf(why, sizeof why, "connecting to %s: %s", addr.sun_path, strerror(errno));
        return without_agent(command, &conf, version, run_dir, why);
    }
    struct timeval timeout = {.tv_sec = REPLY_TIMEOUT_SECONDS};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);

    /* The namespace as a descriptor: the agent, in its own mount namespace, could not open the path. */
    const char *netns = getenv("CNI_NETNS");
    int netns_fd = -1;
    if (netns && netns[0]) netns_fd = open(netns, O_RDONLY | O_CLOEXEC);

    if (send_request(sock, netns_fd, &conf) < 0) {
        char why[4300];
        snprintf(why, sizeof why, "sending to %s: %s", addr.sun_path, strerror(errno));
        return without_agent(command, &conf, version, run_dir, why);
    }
    struct buf reply = {0};
    if (read_all(sock, &reply, MAX_CONF) < 0 || buf_add(&reply, "", 0) < 0) {
        char why[4300];
        snprintf(why, sizeof why, "reading the answer from %s: %s", addr.sun_path, strerror(errno));
        return without_agent(command, &conf, version, run_dir, why);
    }
    char *newline = reply.data ? strchr(reply.data, '\n') : NULL;
    if (!newline) return without_agent(command, &conf, version, run_dir, "the agent closed the connection without an answer");
    int status = atoi(reply.data);
    newline++;
    write_all(1, newline, reply.len - (size_t)(newline - reply.data));
    return status;
}
