/* Smoke test of the Kiln C API: compile an ONNX model, save and reload the artifact, run it
 * on a float input with caller-owned buffers, write the output's raw bytes.
 * usage: smoke MODEL.onnx ARTIFACT.kiln INPUT.bin D0 D1 OUTPUT.bin (input named "input") */
#include "kiln.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what) {
    fprintf(stderr, "%s failed: %s\n", what, kiln_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: smoke MODEL.onnx ARTIFACT.kiln INPUT.bin D0 D1 OUTPUT.bin\n");
        return 2;
    }
    char shapes[128];
    snprintf(shapes, sizeof shapes, "input=%sx%s", argv[4], argv[5]);
    KilnArtifact *art = kiln_compile(argv[1], "cpu", shapes, -1);
    if (!art) return fail("kiln_compile");
    if (kiln_artifact_save(art, argv[2]) != 0) return fail("kiln_artifact_save");
    kiln_artifact_free(art);
    /* errors are reported, not crashes */
    if (kiln_session_load("/nonexistent.kiln") != NULL || strlen(kiln_last_error()) == 0) {
        fprintf(stderr, "loading a missing file did not fail cleanly\n");
        return 1;
    }
    KilnSession *s = kiln_session_load(argv[2]);
    if (!s) return fail("kiln_session_load");
    if (kiln_session_num_inputs(s) != 1 || kiln_session_num_outputs(s) != 1) {
        fprintf(stderr, "unexpected input/output count\n");
        return 1;
    }
    uintptr_t shape[2] = {(uintptr_t)atol(argv[4]), (uintptr_t)atol(argv[5])};
    size_t n = shape[0] * shape[1];
    float *x = malloc(n * sizeof(float));
    FILE *f = fopen(argv[3], "rb");
    if (!f || fread(x, sizeof(float), n, f) != n) {
        fprintf(stderr, "cannot read %s\n", argv[3]);
        return 1;
    }
    fclose(f);
    KilnTensor in = {KILN_D_TYPE_F32, 2, shape, x, n * sizeof(float)};
    uintptr_t oshape[8];
    uintptr_t rank = 0;
    if (kiln_session_output_shape(s, &in, 1, 0, oshape, 8, &rank) != 0)
        return fail("kiln_session_output_shape");
    size_t on = 1;
    for (size_t i = 0; i < rank; i++) on *= oshape[i];
    float *y = malloc(on * sizeof(float));
    KilnBuffer out = {y, on * sizeof(float)};
    if (kiln_session_run(s, &in, 1, &out, 1) != 0) return fail("kiln_session_run");
    /* a wrong buffer size is refused with a message */
    KilnBuffer bad = {y, 4};
    if (kiln_session_run(s, &in, 1, &bad, 1) == 0 || strstr(kiln_last_error(), "bytes") == NULL) {
        fprintf(stderr, "a short output buffer was not refused: %s\n", kiln_last_error());
        return 1;
    }
    FILE *g = fopen(argv[6], "wb");
    if (!g || fwrite(y, sizeof(float), on, g) != on) {
        fprintf(stderr, "cannot write %s\n", argv[6]);
        return 1;
    }
    fclose(g);
    printf("ok: %s -> output %s rank %zu, %zu values\n", kiln_session_input_name(s, 0),
           kiln_session_output_name(s, 0), (size_t)rank, on);
    kiln_session_free(s);
    free(x);
    free(y);
    return 0;
}
