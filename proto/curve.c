/* curve.c - CurveZMQ key files and socket options; see curve.h. */
#include "curve.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zmq.h>

#define KEY_FILE_MAX 4096 /* a key file is a comment and a key: anything longer is not one */

bool curve_available(void)
{
    return zmq_has("curve") != 0;
}

bool curve_key_valid(const char *s, size_t len)
{
    if (!s || len != CURVE_KEY_Z85) return false;
    char z[CURVE_KEY_Z85 + 1];
    uint8_t raw[CURVE_KEY_BYTES];
    memcpy(z, s, len);
    z[len] = 0;
    return zmq_z85_decode(raw, z) != NULL;
}

int curve_key_parse(const char *text, size_t len, const char *name, char *key, fl_error_t *err)
{
    int line_no = 0;
    for (const char *p = text, *end = text + len; p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p)), *eol = nl ? nl : end;
        line_no++;
        while (p < eol && (*p == ' ' || *p == '\t' || *p == '\r')) p++;
        size_t n = 0;
        while (p + n < eol && p[n] != ' ' && p[n] != '\t' && p[n] != '\r') n++;
        if (n && *p != '#') {
            if (!curve_key_valid(p, n))
                return fl_fail(err, FL_EFORMAT, "%s:%d: not a CURVE key (%d Z85 characters, as folioctl keygen writes)",
                               name, line_no, CURVE_KEY_Z85);
            memcpy(key, p, n);
            key[n] = 0;
            return FL_OK;
        }
        p = nl ? nl + 1 : end;
    }
    return fl_fail(err, FL_EFORMAT, "%s: no key in it (a line of %d Z85 characters)", name, CURVE_KEY_Z85);
}

int curve_key_read(const char *path, char *key, fl_error_t *err)
{
    if (!path || !*path) return fl_fail(err, FL_EINVAL, "no key file named");
    FILE *f = fopen(path, "rb");
    if (!f) return fl_fail(err, FL_EIO, "%s: %s", path, strerror(errno));
    char text[KEY_FILE_MAX + 1];
    const size_t n = fread(text, 1, sizeof text, f);
    const bool bad = ferror(f);
    fclose(f);
    if (bad) return fl_fail(err, FL_EIO, "%s: read failed", path);
    if (n > KEY_FILE_MAX) return fl_fail(err, FL_EFORMAT, "%s: over %d bytes, not a key file", path, KEY_FILE_MAX);
    const int rc = curve_key_parse(text, n, path, key, err);
    memset(text, 0, sizeof text); /* a secret key does not linger on the stack */
    return rc;
}

int curve_public_of(const char *secret_key, char *public_key, fl_error_t *err)
{
    if (!curve_key_valid(secret_key, secret_key ? strlen(secret_key) : 0))
        return fl_fail(err, FL_EINVAL, "not a CURVE secret key");
    if (zmq_curve_public(public_key, secret_key))
        return fl_fail(err, FL_EUNSUPPORTED, "zmq_curve_public: %s (libzmq without CURVE?)", zmq_strerror(errno));
    return FL_OK;
}

static bool name_ok(const char *s)
{
    if (!*s || strlen(s) > CURVE_KEYGEN_NAME_MAX || *s == '.') return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '.' ||
              *s == '_' || *s == '-'))
            return false;
    return true;
}

/* Creates path (never over an existing file) with mode and writes text; FL_OK or an error. */
static int write_new(const char *path, mode_t mode, const char *text, fl_error_t *err)
{
    const int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0) return fl_fail(err, FL_EIO, "%s: %s", path, strerror(errno));
    const size_t len = strlen(text);
    const bool ok = fchmod(fd, mode) == 0 && write(fd, text, len) == (ssize_t)len;
    const int e = errno;
    if (close(fd) || !ok) {
        unlink(path);
        return fl_fail(err, FL_EIO, "%s: %s", path, strerror(ok ? errno : e));
    }
    return FL_OK;
}

int curve_keygen(const char *dir, const char *name, char *public_key, fl_error_t *err)
{
    if (!curve_available()) return fl_fail(err, FL_EUNSUPPORTED, "this libzmq was built without CURVE (libsodium)");
    if (!name_ok(name))
        return fl_fail(err, FL_EINVAL, "key name '%.80s': up to %d letters, digits, '.', '_' or '-' (not first '.')",
                       name, CURVE_KEYGEN_NAME_MAX);
    if (strlen(dir) > 4096) return fl_fail(err, FL_EINVAL, "output directory name too long");
    if (mkdir(dir, 0700) && errno != EEXIST) return fl_fail(err, FL_EIO, "%s: %s", dir, strerror(errno));
    char pub[CURVE_KEY_Z85 + 1], sec[CURVE_KEY_Z85 + 1];
    if (zmq_curve_keypair(pub, sec)) return fl_fail(err, FL_EIO, "zmq_curve_keypair: %s", zmq_strerror(errno));
    char sec_path[4200], pub_path[4200], text[256];
    snprintf(sec_path, sizeof sec_path, "%s/%s.secret", dir, name);
    snprintf(pub_path, sizeof pub_path, "%s/%s.public", dir, name);
    if (!access(pub_path, F_OK))
        return fl_fail(err, FL_EIO, "%s: already exists (keys are never overwritten)", pub_path);
    snprintf(text, sizeof text, "# folio CURVE secret key '%s' (folioctl keygen): keep it private\n%s\n", name, sec);
    int rc = write_new(sec_path, 0600, text, err);
    memset(text, 0, sizeof text);
    memset(sec, 0, sizeof sec);
    if (rc) return rc;
    snprintf(text, sizeof text, "# folio CURVE public key '%s' (folioctl keygen)\n%s %s\n", name, pub, name);
    if ((rc = write_new(pub_path, 0644, text, err))) {
        unlink(sec_path);
        return rc;
    }
    if (public_key) memcpy(public_key, pub, sizeof pub);
    return FL_OK;
}

static int set_key(void *sock, int option, const char *what, const char *z85, fl_error_t *err)
{
    if (!curve_key_valid(z85, z85 ? strlen(z85) : 0)) return fl_fail(err, FL_EINVAL, "%s: not a CURVE key", what);
    if (zmq_setsockopt(sock, option, z85, CURVE_KEY_Z85 + 1))
        return fl_fail(err, FL_EUNSUPPORTED, "%s: zmq_setsockopt: %s", what, zmq_strerror(errno));
    return FL_OK;
}

int curve_client_setup(void *sock, const char *secret_key, const char *server_key, fl_error_t *err)
{
    char pub[CURVE_KEY_Z85 + 1];
    if (!curve_available()) return fl_fail(err, FL_EUNSUPPORTED, "this libzmq was built without CURVE (libsodium)");
    int rc = curve_public_of(secret_key, pub, err);
    if (!rc) rc = set_key(sock, ZMQ_CURVE_SERVERKEY, "the coordinator's public key", server_key, err);
    if (!rc) rc = set_key(sock, ZMQ_CURVE_PUBLICKEY, "our public key", pub, err);
    if (!rc) rc = set_key(sock, ZMQ_CURVE_SECRETKEY, "our secret key", secret_key, err);
    return rc;
}

int curve_client_setup_files(void *sock, const char *secret_path, const char *server_key_path, fl_error_t *err)
{
    if (!secret_path != !server_key_path)
        return fl_fail(err, FL_EINVAL,
                       "CURVE needs both a secret key file and the coordinator's public key file "
                       "(--curve-secret and --coordinator-key)");
    char sec[CURVE_KEY_Z85 + 1], server[CURVE_KEY_Z85 + 1];
    int rc = curve_key_read(secret_path, sec, err);
    if (!rc) rc = curve_key_read(server_key_path, server, err);
    if (!rc) rc = curve_client_setup(sock, sec, server, err);
    memset(sec, 0, sizeof sec);
    return rc;
}

int curve_server_setup(void *sock, const char *secret_key, const char *zap_domain, fl_error_t *err)
{
    const int one = 1;
    if (!curve_available()) return fl_fail(err, FL_EUNSUPPORTED, "this libzmq was built without CURVE (libsodium)");
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof one) ||
        zmq_setsockopt(sock, ZMQ_ZAP_DOMAIN, zap_domain, strlen(zap_domain)))
        return fl_fail(err, FL_EUNSUPPORTED, "zmq_setsockopt: %s", zmq_strerror(errno));
    return set_key(sock, ZMQ_CURVE_SECRETKEY, "the coordinator's secret key", secret_key, err);
}
