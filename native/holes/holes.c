/*
 * holes: where a file's data lies, by lseek(SEEK_DATA / SEEK_HOLE), which
 * Node's fs does not offer. One synchronous call, extents(fd, offset, length),
 * returns a flat array [start, end, start, end, ...] of data ranges inside
 * [offset, offset + length), or null where the file system cannot tell
 * (EINVAL, ENOTSUP): the caller then treats the range as data and reads it.
 * The calls are metadata lookups (no data is read), cheap enough for the
 * event loop. After MAX_RANGES ranges the answer stops, and one more number
 * (an odd length) says up to where it holds; the caller asks again from there,
 * so that no file makes one unbounded array.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <node_api.h>

#define MAX_RANGES 4096

static napi_value throw_errno (napi_env env, int err, const char *what) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
  napi_throw_error(env, err == EBADF ? "EBADF" : "EIO", msg);
  return NULL;
}

static napi_value extents (napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3) {
    napi_throw_type_error(env, NULL, "extents(fd, offset, length)");
    return NULL;
  }
  int32_t fd;
  int64_t offset, length;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[2], &length) != napi_ok || offset < 0 || length < 0) {
    napi_throw_type_error(env, NULL, "extents(fd, offset, length): numbers, not negative");
    return NULL;
  }
  const int64_t end = offset + length;
  napi_value out;
  napi_create_array(env, &out);
  uint32_t n = 0;
  int64_t at = offset;
  while (at < end) {
    off_t data = lseek(fd, (off_t)at, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break; /* no data from here to the end of the file */
      if (errno == EINVAL || errno == ENOTSUP || errno == EOPNOTSUPP) {
        napi_value none;
        napi_get_null(env, &none);
        return none;
      }
      return throw_errno(env, errno, "lseek SEEK_DATA");
    }
    if (data >= end) break;
    if (n == 2 * MAX_RANGES) {
      napi_value until;
      napi_create_int64(env, (int64_t)data, &until);
      napi_set_element(env, out, n, until);
      return out;
    }
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) return throw_errno(env, errno, "lseek SEEK_HOLE");
    if (hole > end) hole = end;
    napi_value a, b;
    napi_create_int64(env, (int64_t)data, &a);
    napi_create_int64(env, (int64_t)hole, &b);
    napi_set_element(env, out, n++, a);
    napi_set_element(env, out, n++, b);
    at = hole;
  }
  return out;
}

NAPI_MODULE_INIT (/* napi_env env, napi_value exports */) {
  napi_value fn;
  napi_create_function(env, "extents", NAPI_AUTO_LENGTH, extents, NULL, &fn);
  napi_set_named_property(env, exports, "extents", fn);
  return exports;
}
