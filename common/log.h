/* log.h - the one logger: levels, key=value fields, to stderr.
 *
 * fl_log_info("model loaded path=%s layers=%d", path, n). The level comes from FOLIO_LOG
 * (debug|info|warn|error, default info) or fl_log_set_level(). Thread-safe: one fprintf per line. */
#ifndef FOLIO_LOG_H
#define FOLIO_LOG_H

typedef enum { FL_LOG_DEBUG = 0, FL_LOG_INFO, FL_LOG_WARN, FL_LOG_ERROR, FL_LOG_OFF } fl_log_level_t;

void fl_log_set_level(fl_log_level_t level);
fl_log_level_t fl_log_level(void);
void fl_log(fl_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define fl_log_debug(...) fl_log(FL_LOG_DEBUG, __VA_ARGS__)
#define fl_log_info(...) fl_log(FL_LOG_INFO, __VA_ARGS__)
#define fl_log_warn(...) fl_log(FL_LOG_WARN, __VA_ARGS__)
#define fl_log_error(...) fl_log(FL_LOG_ERROR, __VA_ARGS__)

#endif
