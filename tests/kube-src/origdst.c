/* The kube tests' stand-in for a proxy, an app and a client, in one static binary.
 *
 *   origdst serve LABEL PORT...   listens on each port (all addresses) and answers every
 *                                 connection with one line "LABEL <port accepted on> <ip:port>",
 *                                 the address being the connection's original destination
 *                                 (SO_ORIGINAL_DST, set when a REDIRECT rule sent it here) or,
 *                                 for a connection nothing redirected, the address it reached.
 *   origdst connect HOST PORT     connects (5 s timeout), prints the one line it is answered
 *                                 with, exits 0; exits 1 on any failure.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/netfilter_ipv4.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define MAX_PORTS 8

static int serve(const char *label, int nports, char **ports) {
    struct pollfd fds[MAX_PORTS];
    int numbers[MAX_PORTS];
    if (nports < 1 || nports > MAX_PORTS) return 2;
    for (int i = 0; i < nports; i++) {
        int one = 1;
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY)};
        numbers[i] = atoi(ports[i]);
        addr.sin_port = htons((unsigned short)numbers[i]);
        fds[i].fd = socket(AF_INET, SOCK_STREAM, 0);
        fds[i].events = POLLIN;
        setsockopt(fds[i].fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fds[i].fd, (struct sockaddr *)&addr, sizeof addr) || listen(fds[i].fd, 16)) {
            fprintf(stderr, "origdst: port %s: %s\n", ports[i], strerror(errno));
            return 1;
        }
    }
    printf("ready %s\n", label);
    fflush(stdout);
    for (;;) {
        if (poll(fds, (nfds_t)nports, -1) < 0 && errno != EINTR) return 1;
        for (int i = 0; i < nports; i++) {
            struct sockaddr_in dst;
            socklen_t len = sizeof dst;
            char line[128], ip[INET_ADDRSTRLEN];
            int conn;
            if (!(fds[i].revents & POLLIN)) continue;
            conn = accept(fds[i].fd, NULL, NULL);
            if (conn < 0) continue;
            if (getsockopt(conn, SOL_IP, SO_ORIGINAL_DST, &dst, &len) != 0) {
                len = sizeof dst;
                getsockname(conn, (struct sockaddr *)&dst, &len);
            }
            inet_ntop(AF_INET, &dst.sin_addr, ip, sizeof ip);
            snprintf(line, sizeof line, "%s %d %s:%d\n", label, numbers[i], ip, ntohs(dst.sin_port));
            if (write(conn, line, strlen(line)) < 0) perror("origdst: write");
            close(conn);
        }
    }
}

static int connect_once(const char *host, const char *port) {
    struct sockaddr_in addr = {.sin_family = AF_INET};
    struct timeval timeout = {.tv_sec = 5};
    char line[128];
    ssize_t n, got = 0;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    addr.sin_port = htons((unsigned short)atoi(port));
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) return 2;
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) {
        fprintf(stderr, "origdst: connect %s:%s: %s\n", host, port, strerror(errno));
        return 1;
    }
    while (got < (ssize_t)sizeof line - 1 && (n = read(s, line + got, sizeof line - 1 - (size_t)got)) > 0)
        got += n;
    if (got <= 0) {
        fprintf(stderr, "origdst: no answer from %s:%s\n", host, port);
        return 1;
    }
    line[got] = 0;
    fputs(line, stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 4 && strcmp(argv[1], "serve") == 0) return serve(argv[2], argc - 3, argv + 3);
    if (argc == 4 && strcmp(argv[1], "connect") == 0) return connect_once(argv[2], argv[3]);
    fprintf(stderr, "usage: origdst serve LABEL PORT... | origdst connect HOST PORT\n");
    return 2;
}
