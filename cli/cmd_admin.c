/* cmd_admin.c - folioctl's cluster administration:
 *
 *   up                 a coordinator, worker groups and the HTTP gateway on this machine, in the
 *                      foreground
 *   status [--json]    groups, load, KV use, prefix-cache hit rate, mean accepted length of
 *                      speculative decoding, routing latency
 *   metrics            the same figures in the Prometheus text format (what the gateway's /metrics
 *                      serves)
 *   health [--json]    whether the cluster serves (exit 0 when it does)
 *   drain GROUP / undrain GROUP
 *   keygen --out DIR [--name NAME]   a CURVE key pair (proto/curve.h)
 *
 * `up` starts the processes through cli_cluster.c and supervises them (cluster_supervise): a child
 * that exits or is killed is logged and started again, after a delay that grows while it keeps
 * dying; SIGINT or SIGTERM stops them all and restarts nothing. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli_cluster.h"
#include "cli_json.h"
#include "curve.h"
#include "folio_metrics.h"
#include "folioctl.h"
#include "model_path.h"

/* SIGCHLD only wakes the supervisor's sleep early. */
static void on_child(int sig)
{
    (void)sig;
}

/* The coordinator's Status reply (to free), or NULL once the error is printed. */
static Folio__V1__Response *fetch_status(const ctl_flags_t *f)
{
    folio_client_t *c = ctl_connect(f);
    if (!c) return NULL;
    fl_error_t err = {0};
    Folio__V1__Response *r = NULL;
    if (folio_client_status(c, 5000, &r, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        r = NULL;
    }
    folio_client_destroy(&c);
    return r;
}

int cmd_status(const ctl_flags_t *f)
{
    Folio__V1__Response *r = fetch_status(f);
    if (!r) return 1;
    const Folio__V1__StatusReply *s = r->cluster;
    if (f->json) {
        cli_json_print_pb(&s->base);
    } else {
        printf("%-12s %-6s %-7s %-5s %8s %7s %7s %8s %18s %6s %8s %6s %7s\n", "GROUP", "RANKS", "HEALTHY", "DRAIN",
               "RESTARTS", "RUNNING", "WAITING", "INFLIGHT", "KV USED/CACHED/TOT", "HIT%", "TOK/S", "ACCEPT", "HB AGE");
        uint64_t prompt = 0, cached = 0, generated = 0;
        double tps = 0;
        for (size_t i = 0; i < s->n_groups; i++) {
            const Folio__V1__GroupStatus *g = s->groups[i];
            const Folio__V1__WorkerLoad *l = g->load;
            char ranks[32] = "", kv[32] = "-", hit[16] = "-", accept[16] = "-";
            for (size_t k = 0; k < g->n_ranks && strlen(ranks) < 24; k++)
                snprintf(ranks + strlen(ranks), sizeof ranks - strlen(ranks), "%s%u", k ? "," : "", g->ranks[k]);
            if (!g->n_ranks) snprintf(ranks, sizeof ranks, "-");
            if (g->tp_size > 1) snprintf(ranks + strlen(ranks), sizeof ranks - strlen(ranks), "/%u", g->tp_size);
            if (l) {
                snprintf(kv, sizeof kv, "%u/%u/%u", l->kv_blocks_used, l->kv_blocks_cached, l->kv_blocks_total);
                if (l->prompt_tokens)
                    snprintf(hit, sizeof hit, "%.1f",
                             100.0 * (double)l->cached_prompt_tokens / (double)l->prompt_tokens);
                prompt += l->prompt_tokens;
                cached += l->cached_prompt_tokens;
                generated += l->generated_tokens;
                tps += l->tokens_per_s;
            }
            /* Tokens a sequence gains per step that verified a draft; "-" when none did. */
            if (g->mean_accepted_length > 0) snprintf(accept, sizeof accept, "%.2f", g->mean_accepted_length);
            printf("%-12s %-6s %-7s %-5s %8u %7u %7u %8u %18s %6s %8.1f %6s %6.1fs\n", g->name, ranks,
                   g->healthy ? "yes" : "NO", g->draining ? "yes" : "no", g->restarts, l ? l->running : 0,
                   l ? l->waiting : 0, g->inflight, kv, hit, l ? l->tokens_per_s : 0.0, accept,
                   g->last_heartbeat_age_s);
        }
        if (!s->n_groups) printf("(no worker groups registered)\n");
        for (size_t i = 0; i < s->n_groups; i++) /* KV cache: element type, bytes per token, capacity */
            if (*s->groups[i]->kv_type)
                printf("kv cache %s: %s, %u bytes/token, %llu tokens; pulls: %llu blocks in, %llu ended early, "
                       "%llu blocks out%s%s\n",
                       s->groups[i]->name, s->groups[i]->kv_type, s->groups[i]->kv_bytes_per_token,
                       (unsigned long long)s->groups[i]->kv_capacity_tokens,
                       (unsigned long long)s->groups[i]->kv_pulled_blocks,
                       (unsigned long long)s->groups[i]->kv_pull_failures,
                       (unsigned long long)s->groups[i]->kv_served_blocks, *s->groups[i]->kv_peer_endpoint ? " at " : "",
                       s->groups[i]->kv_peer_endpoint);
        if (s->tenant_view) /* a CURVE key without the admin role sees its own requests only */
            printf("policy %s, block size %u; tenant %s: %llu requests in flight (every tenant's figures need an "
                   "admin key)\n",
                   *s->policy ? s->policy : "-", s->block_size, *s->tenant ? s->tenant : "(default)",
                   (unsigned long long)s->tenant_requests_inflight);
        else
            printf("policy %s, block size %u; requests: %llu total, %llu in flight, %llu failed over (%llu migrated "
                   "mid-stream)\n",
                   *s->policy ? s->policy : "-", s->block_size, (unsigned long long)s->requests_total,
                   (unsigned long long)s->requests_inflight, (unsigned long long)s->requests_failed_over,
                   (unsigned long long)s->requests_migrated);
        printf("tokens: %llu prompt (%.1f%% from the prefix cache), %llu generated, %.1f tok/s now; "
               "route p50 %.0f us, p99 %.0f us\n",
               (unsigned long long)prompt, prompt ? 100.0 * (double)cached / (double)prompt : 0.0,
               (unsigned long long)generated, tps, s->route_p50_us, s->route_p99_us);
    }
    folio__v1__response__free_unpacked(r, NULL);
    return 0;
}

int cmd_metrics(const ctl_flags_t *f)
{
    Folio__V1__Response *r = fetch_status(f);
    if (!r) return 1;
    char *text = folio_metrics_render(r->cluster);
    const int rc = text ? 0 : 1;
    if (text)
        fputs(text, stdout);
    else
        fprintf(stderr, "error: out of memory rendering the metrics\n");
    free(text);
    folio__v1__response__free_unpacked(r, NULL);
    return rc;
}

int cmd_health(const ctl_flags_t *f)
{
    folio_client_t *c = ctl_connect(f);
    if (!c) return 1;
    fl_error_t err = {0};
    Folio__V1__Response *r = NULL;
    if (folio_client_health(c, 5000, &r, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        folio_client_destroy(&c);
        return 1;
    }
    const Folio__V1__HealthReply *h = r->health;
    const bool serving = h->serving;
    if (f->json)
        cli_json_print_pb(&h->base);
    else
        printf("%s: %u of %u groups healthy\n", serving ? "serving" : "NOT serving", h->healthy_groups, h->groups);
    folio__v1__response__free_unpacked(r, NULL);
    folio_client_destroy(&c);
    return serving ? 0 : 1;
}

int cmd_drain(const ctl_flags_t *f, bool undrain)
{
    if (!f->positional) {
        fprintf(stderr, "error: %s needs a GROUP (see folioctl status)\n", undrain ? "undrain" : "drain");
        return 2;
    }
    folio_client_t *c = ctl_connect(f);
    if (!c) return 1;
    fl_error_t err = {0};
    int rc = folio_client_drain(c, f->positional, undrain, 5000, &err);
    if (rc)
        fprintf(stderr, "error: %s\n", err.msg);
    else
        printf("%s %s\n", f->positional, undrain ? "undrained: admitting new requests" : "draining: no new requests");
    folio_client_destroy(&c);
    return rc ? 1 : 0;
}

int cmd_up(const ctl_flags_t *f)
{
    static const char *const insecure_args[] = {"--insecure", NULL};
    /* up's cluster runs without keys: keys in the environment (for a keyed coordinator elsewhere)
     * would make its own health checks and its gateway speak CURVE to a plaintext coordinator. */
    if (getenv(CURVE_ENV_SECRET) || getenv(CURVE_ENV_COORDINATOR_KEY)) {
        fprintf(stderr, "note: %s and %s are ignored by up (its cluster runs without keys)\n", CURVE_ENV_SECRET,
                CURVE_ENV_COORDINATOR_KEY);
        unsetenv(CURVE_ENV_SECRET);
        unsetenv(CURVE_ENV_COORDINATOR_KEY);
    }
    cluster_opts_t o = {.model = f->engine.model_path,
                        .n_groups = (int)f->groups,
                        .tp = (int)f->tp,
                        .threads_per_worker = (int)f->threads_per_worker,
                        .client_endpoint = f->listen ? f->listen : f->coordinator,
                        .worker_endpoint = f->workers,
                        .policy = f->policy,
                        .kv_budget_bytes = f->engine.kv_budget_bytes,
                        .block_size = f->engine.block_size,
                        .kv_type_k = f->engine.kv_type_k,
                        .kv_type_v = f->engine.kv_type_v,
                        .max_batch_tokens = (int)f->max_batch_tokens,
                        .no_prefix_cache = f->no_prefix_cache,
                        .heartbeat_ms = (int)f->heartbeat_ms,
                        .spec = f->gen.spec_given ? folio_spec_mode_name(f->gen.spec) : NULL,
                        .heads = f->engine.heads_path,
                        .spec_tree = f->spec_tree,
                        .log_dir = f->log_dir,
                        .coordinator_args = f->insecure ? insecure_args : NULL,
                        .progress = true};
    /* The HTTP gateway: --http, else $FOLIO_HTTP, else port 8080, where a taken port only leaves it
     * out (with a warning) since nobody asked for that port. */
    const char *env_http = getenv("FOLIO_HTTP");
    if (!f->no_http) {
        o.http = f->http ? f->http : env_http && *env_http ? env_http : "8080";
        o.http_optional = !f->http && !(env_http && *env_http);
    }
    ctl_interrupted = 0;
    ctl_set_handler(SIGINT, ctl_on_interrupt);
    ctl_set_handler(SIGTERM, ctl_on_interrupt);
    ctl_set_handler(SIGCHLD, on_child);
    fprintf(stderr, "starting coordinator, %d worker group%s%s%s on %s ...\n", o.n_groups, o.n_groups == 1 ? "" : "s",
            o.tp > 1 ? " of tensor-parallel ranks" : "", o.http ? " and the HTTP gateway" : "", fl_model_path(o.model));
    fl_error_t err = {0};
    cluster_t *cl = cluster_start(&o, 600000, &err);
    if (!cl) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    printf("coordinator pid %d  clients: %s  workers: %s\n", (int)cl->coordinator, cl->client_endpoint,
           cl->worker_endpoint);
    for (int i = 0; i < cl->n_workers; i++)
        if (cl->tp > 1)
            printf("group g%d rank %d  pid %d  healthy\n", i / cl->tp, i % cl->tp, (int)cl->workers[i]);
        else
            printf("group g%d  pid %d  healthy\n", i, (int)cl->workers[i]);
    if (cl->gateway > 0) printf("gateway pid %d  OpenAI-compatible HTTP: %s/v1\n", (int)cl->gateway, cl->http_url);
    printf("folio cluster up: %d group%s serving at %s%s%s (Ctrl-C stops it)\n", cl->n_groups,
           cl->n_groups == 1 ? "" : "s", cl->client_endpoint, cl->gateway > 0 ? " and " : "",
           cl->gateway > 0 ? cl->http_url : "");
    fflush(stdout);
    /* Supervise until told to stop; a signal between the check and the sleep costs one 100 ms. */
    while (!ctl_interrupted) {
        struct timespec ts = {0, 100 * 1000000L};
        nanosleep(&ts, NULL);
        if (ctl_interrupted) break;
        cluster_supervise(cl);
    }
    fprintf(stderr, "stopping the cluster ...\n");
    cluster_stop(&cl);
    return 0;
}

int cmd_keygen(const ctl_flags_t *f)
{
    if (!f->out_dir) {
        fprintf(stderr, "error: keygen needs --out DIR (folioctl keygen --out DIR [--name NAME])\n");
        return 2;
    }
    const char *name = f->key_name ? f->key_name : "folio";
    char pub[CURVE_KEY_Z85 + 1];
    fl_error_t err = {0};
    if (curve_keygen(f->out_dir, name, pub, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    printf("%s/%s.secret  secret key (mode 0600): --curve-secret of its owner only\n", f->out_dir, name);
    printf("%s/%s.public  public key %s: for --worker-keys, --client-keys or --coordinator-key\n", f->out_dir, name,
           pub);
    return 0;
}
