/* log.c - see log.h. A line is "ts=<seconds> level=<lvl> <message>". */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int g_level = -1;

static fl_log_level_t level_from_env(void)
{
    const char *s = getenv("FOLIO_LOG");
    if (!s) return FL_LOG_INFO;
    if (!strcmp(s, "debug")) return FL_LOG_DEBUG;
    if (!strcmp(s, "warn")) return FL_LOG_WARN;
    if (!strcmp(s, "error")) return FL_LOG_ERROR;
    if (!strcmp(s, "off")) return FL_LOG_OFF;
    return FL_LOG_INFO;
}

void fl_log_set_level(fl_log_level_t level) { g_level = (int)level; }

fl_log_level_t fl_log_level(void)
{
    if (g_level < 0) g_level = (int)level_from_env();
    return (fl_log_level_t)g_level;
}

void fl_log(fl_log_level_t level, const char *fmt, ...)
{
    static const char *names[] = {"debug", "info", "warn", "error"};
    if (level < fl_log_level() || level >= FL_LOG_OFF) return;
    char line[2048];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int n = snprintf(line, sizeof line, "ts=%lld.%03ld level=%s ", (long long)ts.tv_sec, ts.tv_nsec / 1000000,
                     names[level]);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof line) vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s\n", line);
}
