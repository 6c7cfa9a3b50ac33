/*
 * kvm-c-target: a kvmspec conformance target written in C.
 *
 * It speaks the kvmspec subprocess protocol (docs/conformance.md): kvmspec writes one trace
 * operation per line on standard input, exactly the JSON objects of trace format v1
 * (docs/trace-format.md), after a header line {"format": "kvmspec-trace/1", "platform": ...};
 * the program answers every operation with one line on standard output, the observation
 * ({"errno": 0}, {"errno": "EEXIST"}, {"errno": 0, "bitmap": [...]}, ...).
 *
 * It drives one real VM through /dev/kvm, the way any VMM would, for a subset of the
 * operations: mmap, set_user_memory_region, set_user_memory_region2, create_guest_memfd,
 * get_dirty_log, clear_dirty_log, check_extension, set_nr_mmu_pages, enable_cap
 * (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 only), create_vcpu and reset_dirty_rings. Every other
 * operation is answered {"unsupported": "<op>"}, which kvmspec reports as skipped, not
 * failed. An input it cannot read ends the program with status 2 and one line on standard
 * error; a platform it cannot serve, or a /dev/kvm it cannot open, with status 3.
 *
 * The ioctl numbers and struct layouts are facts of the KVM uAPI (include/uapi/linux/kvm.h,
 * v6.18), written out here so that the program builds without kernel headers.
 *
 * Build: cc -O2 -Wall -Werror -o kvm-c-target kvm-c-target.c   (or `make example-target`)
 * Extra: `kvm-c-target --errno-names` prints "code name" for errnos 1..200, which a test
 * compares with Python's errno.errorcode.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

/* ------------------------------------------------------------------ the KVM uAPI */

#define KVMIO 0xAE
#define KVM_API_VERSION 12
#define PAGE_SHIFT 12
#define PAGE_SIZE (1UL << PAGE_SHIFT)

struct kvm_userspace_memory_region {
	uint32_t slot; /* as_id << 16 | slot id */
	uint32_t flags;
	uint64_t guest_phys_addr;
	uint64_t memory_size;
	uint64_t userspace_addr;
};

/* REGION2 adds a guest_memfd binding; the pads must be zero. */
struct kvm_userspace_memory_region2 {
	uint32_t slot;
	uint32_t flags;
	uint64_t guest_phys_addr;
	uint64_t memory_size;
	uint64_t userspace_addr;
	uint64_t guest_memfd_offset;
	uint32_t guest_memfd;
	uint32_t pad1;
	uint64_t pad2[14];
};

struct kvm_create_guest_memfd {
	uint64_t size;
	uint64_t flags;
	uint64_t reserved[6];
};

struct kvm_dirty_log {
	uint32_t slot;
	uint32_t padding1;
	uint64_t dirty_bitmap; /* a user pointer */
};

struct kvm_clear_dirty_log {
	uint32_t slot;
	uint32_t num_pages;
	uint64_t first_page;
	uint64_t dirty_bitmap; /* a user pointer */
};

struct kvm_enable_cap {
	uint32_t cap;
	uint32_t flags;
	uint64_t args[4];
	uint8_t pad[64];
};

#define KVM_GET_API_VERSION _IO(KVMIO, 0x00)
#define KVM_CREATE_VM _IO(KVMIO, 0x01)
#define KVM_CHECK_EXTENSION _IO(KVMIO, 0x03)
#define KVM_CREATE_VCPU _IO(KVMIO, 0x41)
#define KVM_GET_DIRTY_LOG _IOW(KVMIO, 0x42, struct kvm_dirty_log)
#define KVM_SET_USER_MEMORY_REGION _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#define KVM_ENABLE_CAP _IOW(KVMIO, 0xa3, struct kvm_enable_cap)
#define KVM_CLEAR_DIRTY_LOG _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)
#define KVM_RESET_DIRTY_RINGS _IO(KVMIO, 0xc7)
#define KVM_SET_NR_MMU_PAGES _IO(KVMIO, 0x44)
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)

/* The capabilities a trace can name (the `cap` field kind), with their numbers. */
static const struct {
	const char *name;
	unsigned long number;
} capabilities[] = {
	{"KVM_CAP_MMU_SHADOW_CACHE_CONTROL", 2},
	{"KVM_CAP_USER_MEMORY", 3},
	{"KVM_CAP_NR_MEMSLOTS", 10},
	{"KVM_CAP_SYNC_MMU", 16},
	{"KVM_CAP_JOIN_MEMORY_REGIONS_WORKS", 30},
	{"KVM_CAP_READONLY_MEM", 81},
	{"KVM_CAP_MULTI_ADDRESS_SPACE", 118},
	{"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", 168},
	{"KVM_CAP_DIRTY_LOG_RING", 192},
	{"KVM_CAP_DISABLE_QUIRKS2", 213},
	{"KVM_CAP_DIRTY_LOG_RING_ACQ_REL", 223},
	{"KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP", 225},
	{"KVM_CAP_USER_MEMORY2", 231},
	{"KVM_CAP_MEMORY_ATTRIBUTES", 233},
	{"KVM_CAP_GUEST_MEMFD", 234},
	{"KVM_CAP_VM_TYPES", 235},
	{"KVM_CAP_GUEST_MEMFD_FLAGS", 244},
};
#define KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 168

/* ------------------------------------------------------------------ errno names */

/*
 * Observations name errnos symbolically, exactly as Python's errno.errorcode does, so that
 * a trace means the same on every libc. Where Linux has two names for one number, this is
 * the one Python picks (EAGAIN, EDEADLOCK, ENOTSUP); a number without a name is written as
 * its decimal digits, as kvmspec does.
 */
#define ERRNO(name) {name, #name}
static const struct {
	int code;
	const char *name;
} errno_names[] = {
	ERRNO(EPERM), ERRNO(ENOENT), ERRNO(ESRCH), ERRNO(EINTR), ERRNO(EIO), ERRNO(ENXIO),
	ERRNO(E2BIG), ERRNO(ENOEXEC), ERRNO(EBADF), ERRNO(ECHILD), ERRNO(EAGAIN), ERRNO(ENOMEM),
	ERRNO(EACCES), ERRNO(EFAULT), ERRNO(ENOTBLK), ERRNO(EBUSY), ERRNO(EEXIST), ERRNO(EXDEV),
	ERRNO(ENODEV), ERRNO(ENOTDIR), ERRNO(EISDIR), ERRNO(EINVAL), ERRNO(ENFILE), ERRNO(EMFILE),
	ERRNO(ENOTTY), ERRNO(ETXTBSY), ERRNO(EFBIG), ERRNO(ENOSPC), ERRNO(ESPIPE), ERRNO(EROFS),
	ERRNO(EMLINK), ERRNO(EPIPE), ERRNO(EDOM), ERRNO(ERANGE), ERRNO(EDEADLOCK),
	ERRNO(ENAMETOOLONG), ERRNO(ENOLCK), ERRNO(ENOSYS), ERRNO(ENOTEMPTY), ERRNO(ELOOP),
	ERRNO(ENOMSG), ERRNO(EIDRM), ERRNO(ECHRNG), ERRNO(EL2NSYNC), ERRNO(EL3HLT), ERRNO(EL3RST),
	ERRNO(ELNRNG), ERRNO(EUNATCH), ERRNO(ENOCSI), ERRNO(EL2HLT), ERRNO(EBADE), ERRNO(EBADR),
	ERRNO(EXFULL), ERRNO(ENOANO), ERRNO(EBADRQC), ERRNO(EBADSLT), ERRNO(EBFONT), ERRNO(ENOSTR),
	ERRNO(ENODATA), ERRNO(ETIME), ERRNO(ENOSR), ERRNO(ENONET), ERRNO(ENOPKG), ERRNO(EREMOTE),
	ERRNO(ENOLINK), ERRNO(EADV), ERRNO(ESRMNT), ERRNO(ECOMM), ERRNO(EPROTO), ERRNO(EMULTIHOP),
	ERRNO(EDOTDOT), ERRNO(EBADMSG), ERRNO(EOVERFLOW), ERRNO(ENOTUNIQ), ERRNO(EBADFD),
	ERRNO(EREMCHG), ERRNO(ELIBACC), ERRNO(ELIBBAD), ERRNO(ELIBSCN), ERRNO(ELIBMAX),
	ERRNO(ELIBEXEC), ERRNO(EILSEQ), ERRNO(ERESTART), ERRNO(ESTRPIPE), ERRNO(EUSERS),
	ERRNO(ENOTSOCK), ERRNO(EDESTADDRREQ), ERRNO(EMSGSIZE), ERRNO(EPROTOTYPE),
	ERRNO(ENOPROTOOPT), ERRNO(EPROTONOSUPPORT), ERRNO(ESOCKTNOSUPPORT), ERRNO(ENOTSUP),
	ERRNO(EPFNOSUPPORT), ERRNO(EAFNOSUPPORT), ERRNO(EADDRINUSE), ERRNO(EADDRNOTAVAIL),
	ERRNO(ENETDOWN), ERRNO(ENETUNREACH), ERRNO(ENETRESET), ERRNO(ECONNABORTED),
	ERRNO(ECONNRESET), ERRNO(ENOBUFS), ERRNO(EISCONN), ERRNO(ENOTCONN), ERRNO(ESHUTDOWN),
	ERRNO(ETOOMANYREFS), ERRNO(ETIMEDOUT), ERRNO(ECONNREFUSED), ERRNO(EHOSTDOWN),
	ERRNO(EHOSTUNREACH), ERRNO(EALREADY), ERRNO(EINPROGRESS), ERRNO(ESTALE), ERRNO(EUCLEAN),
	ERRNO(ENOTNAM), ERRNO(ENAVAIL), ERRNO(EISNAM), ERRNO(EREMOTEIO), ERRNO(EDQUOT),
	ERRNO(ENOMEDIUM), ERRNO(EMEDIUMTYPE), ERRNO(ECANCELED), ERRNO(ENOKEY), ERRNO(EKEYEXPIRED),
	ERRNO(EKEYREVOKED), ERRNO(EKEYREJECTED), ERRNO(EOWNERDEAD), ERRNO(ENOTRECOVERABLE),
	ERRNO(ERFKILL),
};

/* Write the observation of a call that returns nothing else: {"errno": 0} or the name. */
static void print_errno_field(int code)
{
	if (code == 0) {
		printf("\"errno\": 0");
		return;
	}
	for (size_t i = 0; i < sizeof(errno_names) / sizeof(errno_names[0]); i++) {
		if (errno_names[i].code == code) {
			printf("\"errno\": \"%s\"", errno_names[i].name);
			return;
		}
	}
	printf("\"errno\": \"%d\"", code);
}

static void answer_errno(int code)
{
	printf("{");
	print_errno_field(code);
	printf("}\n");
}

static void answer_unsupported(const char *op)
{
	printf("{\"unsupported\": \"%s\"}\n", op);
}

/* ------------------------------------------------------------------ reading one line */

/*
 * A minimal reader for the flat JSON objects of trace format v1. A value is a string, an
 * integer (unsigned up to 2^64 - 1, or negative), an object of such values (the
 * {"region": NAME, "offset": N} form of an address) or an array of unsigned integers (the
 * words of a bitmap, the args of enable_cap). Anything else is a protocol error: the program
 * says what and where on standard error and exits with status 2.
 */
#define MAX_FIELDS 16
#define MAX_STRING 80

enum kind { V_INT, V_STRING, V_OBJECT, V_ARRAY };

struct value {
	enum kind kind;
	bool negative;		 /* V_INT: the number is -magnitude */
	uint64_t integer;	 /* V_INT: the magnitude */
	char string[MAX_STRING]; /* V_STRING; V_OBJECT: its "region" */
	uint64_t offset;	 /* V_OBJECT: its "offset" (0 when absent) */
	uint64_t *words;	 /* V_ARRAY: the elements (malloc'ed) */
	size_t count;		 /* V_ARRAY: how many */
};

struct field {
	char key[MAX_STRING];
	struct value value;
};

struct object {
	struct field fields[MAX_FIELDS];
	int count;
};

struct reader {
	const char *text;
	size_t pos;
	unsigned long line; /* the input line, for error messages */
};

static void protocol_error(const struct reader *r, const char *what)
{
	fprintf(stderr, "kvm-c-target: input line %lu, column %zu: %s\n", r->line, r->pos + 1,
		what);
	exit(2);
}

static void skip_space(struct reader *r)
{
	while (r->text[r->pos] == ' ' || r->text[r->pos] == '\t' || r->text[r->pos] == '\r')
		r->pos++;
}

static void expect_char(struct reader *r, char c)
{
	skip_space(r);
	if (r->text[r->pos] != c) {
		char message[40];
		snprintf(message, sizeof(message), "expected '%c'", c);
		protocol_error(r, message);
	}
	r->pos++;
}

/* A string without \u escapes (names and op names are plain ASCII). */
static void read_string(struct reader *r, char *out)
{
	size_t n = 0;

	expect_char(r, '"');
	for (;;) {
		char c = r->text[r->pos++];
		if (c == '\0')
			protocol_error(r, "unterminated string");
		if (c == '"')
			break;
		if (c == '\\') {
			c = r->text[r->pos++];
			if (c != '"' && c != '\\' && c != '/')
				protocol_error(r, "unsupported escape in a string");
		}
		if (n + 1 >= MAX_STRING)
			protocol_error(r, "string too long");
		out[n++] = c;
	}
	out[n] = '\0';
}

/* An integer; the magnitude must fit in 64 bits. */
static void read_integer(struct reader *r, struct value *v)
{
	uint64_t magnitude = 0;
	bool digits = false;

	skip_space(r);
	v->kind = V_INT;
	v->negative = r->text[r->pos] == '-';
	if (v->negative)
		r->pos++;
	while (r->text[r->pos] >= '0' && r->text[r->pos] <= '9') {
		unsigned digit = (unsigned)(r->text[r->pos++] - '0');
		if (magnitude > (UINT64_MAX - digit) / 10)
			protocol_error(r, "integer out of the 64-bit range");
		magnitude = magnitude * 10 + digit;
		digits = true;
	}
	if (!digits)
		protocol_error(r, "expected an integer");
	if (r->text[r->pos] == '.' || r->text[r->pos] == 'e' || r->text[r->pos] == 'E')
		protocol_error(r, "expected an integer, not a fraction");
	v->integer = magnitude;
}

static uint64_t read_unsigned(struct reader *r)
{
	struct value v;

	read_integer(r, &v);
	if (v.negative && v.integer)
		protocol_error(r, "expected an unsigned integer");
	return v.integer;
}

/* {"region": NAME, "offset": N}: the one nested object the format has. */
static void read_address_object(struct reader *r, struct value *v)
{
	char key[MAX_STRING];

	v->kind = V_OBJECT;
	v->string[0] = '\0';
	v->offset = 0;
	expect_char(r, '{');
	skip_space(r);
	if (r->text[r->pos] == '}') {
		r->pos++;
		return;
	}
	for (;;) {
		read_string(r, key);
		expect_char(r, ':');
		if (strcmp(key, "region") == 0)
			read_string(r, v->string);
		else if (strcmp(key, "offset") == 0)
			v->offset = read_unsigned(r);
		else
			protocol_error(r, "unknown key in an address object");
		skip_space(r);
		if (r->text[r->pos] == '}') {
			r->pos++;
			return;
		}
		expect_char(r, ',');
	}
}

/* [N, N, ...] of unsigned integers, grown as needed. */
static void read_array(struct reader *r, struct value *v)
{
	size_t capacity = 0;

	v->kind = V_ARRAY;
	v->words = NULL;
	v->count = 0;
	expect_char(r, '[');
	skip_space(r);
	if (r->text[r->pos] == ']') {
		r->pos++;
		return;
	}
	for (;;) {
		if (v->count == capacity) {
			capacity = capacity ? 2 * capacity : 16;
			v->words = realloc(v->words, capacity * sizeof(uint64_t));
			if (!v->words)
				protocol_error(r, "out of memory for an array");
		}
		v->words[v->count++] = read_unsigned(r);
		skip_space(r);
		if (r->text[r->pos] == ']') {
			r->pos++;
			return;
		}
		expect_char(r, ',');
	}
}

static void read_value(struct reader *r, struct value *v)
{
	skip_space(r);
	switch (r->text[r->pos]) {
	case '"':
		v->kind = V_STRING;
		read_string(r, v->string);
		break;
	case '{':
		read_address_object(r, v);
		break;
	case '[':
		read_array(r, v);
		break;
	default:
		read_integer(r, v);
	}
}

static void free_object(struct object *o)
{
	for (int i = 0; i < o->count; i++)
		if (o->fields[i].value.kind == V_ARRAY)
			free(o->fields[i].value.words);
	o->count = 0;
}

/* One line: a JSON object of key/value pairs. */
static void read_object(struct reader *r, struct object *o)
{
	o->count = 0;
	expect_char(r, '{');
	skip_space(r);
	if (r->text[r->pos] == '}') {
		r->pos++;
	} else {
		for (;;) {
			if (o->count == MAX_FIELDS)
				protocol_error(r, "too many fields");
			struct field *f = &o->fields[o->count];
			read_string(r, f->key);
			expect_char(r, ':');
			read_value(r, &f->value);
			o->count++;
			skip_space(r);
			if (r->text[r->pos] == '}') {
				r->pos++;
				break;
			}
			expect_char(r, ',');
		}
	}
	skip_space(r);
	if (r->text[r->pos] != '\0' && r->text[r->pos] != '\n')
		protocol_error(r, "text after the object");
}

static const struct value *find(const struct object *o, const char *key)
{
	for (int i = 0; i < o->count; i++)
		if (strcmp(o->fields[i].key, key) == 0)
			return &o->fields[i].value;
	return NULL;
}

/* An unsigned field; absent means its default, 0 (kvmspec always sends every field). */
static uint64_t get_u64(const struct object *o, const char *key)
{
	const struct value *v = find(o, key);

	return v && v->kind == V_INT && !v->negative ? v->integer : 0;
}

static const char *get_string(const struct object *o, const char *key)
{
	const struct value *v = find(o, key);

	return v && v->kind == V_STRING ? v->string : "";
}

/* ------------------------------------------------------------------ what a VMM keeps */

/* A named host region: where its mmap put it. */
struct region {
	char name[MAX_STRING];
	uint64_t address;
	uint64_t size;
};

/* A named guest_memfd: the descriptor KVM_CREATE_GUEST_MEMFD returned. */
struct gmem {
	char name[MAX_STRING];
	int fd;
};

/*
 * KVM has no ioctl that reads memslots back, so the VMM remembers the page count of each
 * slot it created: KVM_GET_DIRTY_LOG needs a user buffer of the slot's bitmap size.
 */
struct slot {
	uint32_t id; /* as_id << 16 | slot id */
	uint64_t npages;
};

static struct {
	int vm_fd;
	struct region *regions;
	size_t nregions;
	struct slot *slots;
	size_t nslots;
	struct gmem *gmems;
	size_t ngmems;
	int *vcpu_fds;
	size_t nvcpus;
} vmm = {.vm_fd = -1};

/* Grow an array by one element; the program cannot go on without memory. */
static void *grow(void *array, size_t count, size_t size)
{
	void *bigger = realloc(array, (count + 1) * size);

	if (!bigger) {
		fprintf(stderr, "kvm-c-target: out of memory\n");
		exit(2);
	}
	return bigger;
}

/* The host address a `userspace_addr` stands for: a raw integer, or region + offset (mod
 * 2^64). A region whose mmap failed has no address: it counts from 0, as on every target. */
static uint64_t resolve(const struct value *v)
{
	if (!v)
		return 0;
	if (v->kind == V_OBJECT) {
		for (size_t i = 0; i < vmm.nregions; i++)
			if (strcmp(vmm.regions[i].name, v->string) == 0)
				return vmm.regions[i].address + v->offset;
		return v->offset;
	}
	return v->kind == V_INT ? v->integer : 0;
}

static struct slot *find_slot(uint32_t id)
{
	for (size_t i = 0; i < vmm.nslots; i++)
		if (vmm.slots[i].id == id)
			return &vmm.slots[i];
	return NULL;
}

/* Record an accepted region change as a VMM would: size 0 deleted the slot; on an existing
 * slot KVM accepts only a MOVE or a flags change, and both keep the page count. */
static void track_slot(uint32_t id, uint64_t memory_size)
{
	struct slot *s = find_slot(id);

	if (memory_size == 0) {
		if (s)
			*s = vmm.slots[--vmm.nslots];
	} else if (!s) {
		vmm.slots = grow(vmm.slots, vmm.nslots, sizeof(*vmm.slots));
		vmm.slots[vmm.nslots++] = (struct slot){id, memory_size >> PAGE_SHIFT};
	}
}

/*
 * Bitmap buffers: `nbytes` of user memory that end right at an inaccessible guard page, so
 * that a kernel access beyond what this program sized turns into EFAULT, never into a write
 * over its own memory. Returns NULL when the memory cannot be had.
 */
struct guarded {
	uint8_t *base;
	size_t length;
};

static void *guarded_alloc(struct guarded *g, size_t nbytes)
{
	size_t usable = (nbytes + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);

	if (usable == 0)
		usable = PAGE_SIZE;
	g->length = usable + PAGE_SIZE;
	g->base = mmap(NULL, g->length, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (g->base == MAP_FAILED)
		return NULL;
	if (mprotect(g->base + usable, PAGE_SIZE, PROT_NONE)) {
		munmap(g->base, g->length);
		return NULL;
	}
	return g->base + usable - nbytes;
}

static void guarded_free(struct guarded *g)
{
	munmap(g->base, g->length);
}

/* ------------------------------------------------------------------ operations */

/* mmap: anonymous private memory, known by `region` from then on. The observation also
 * carries "hva", the start address: kvmspec takes it out and uses it to judge the slots
 * that point into the region (see docs/conformance.md). */
static void op_mmap(const struct object *o)
{
	static const struct {
		const char *name;
		int prot;
	} prots[] = {{"rw", PROT_READ | PROT_WRITE}, {"r", PROT_READ}, {"none", PROT_NONE}};
	const char *prot_name = get_string(o, "prot");
	int prot = PROT_READ | PROT_WRITE;
	void *address;

	for (size_t i = 0; i < sizeof(prots) / sizeof(prots[0]); i++)
		if (strcmp(prot_name, prots[i].name) == 0)
			prot = prots[i].prot;
	/* MAP_NORESERVE: KVM never touches the memory before a guest runs, and a large region
	 * must not be refused by overcommit accounting. */
	address = mmap(NULL, get_u64(o, "size"), prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
		       -1, 0);
	if (address == MAP_FAILED) {
		answer_errno(errno);
		return;
	}
	vmm.regions = grow(vmm.regions, vmm.nregions, sizeof(*vmm.regions));
	snprintf(vmm.regions[vmm.nregions].name, MAX_STRING, "%s", get_string(o, "region"));
	vmm.regions[vmm.nregions].size = get_u64(o, "size");
	vmm.regions[vmm.nregions++].address = (uint64_t)(uintptr_t)address;
	printf("{\"errno\": 0, \"hva\": %" PRIu64 "}\n", (uint64_t)(uintptr_t)address);
}

/* KVM_SET_USER_MEMORY_REGION: the struct's fields, the address resolved. */
static void op_set_user_memory_region(const struct object *o)
{
	struct kvm_userspace_memory_region region = {
		.slot = (uint32_t)get_u64(o, "slot"),
		.flags = (uint32_t)get_u64(o, "flags"),
		.guest_phys_addr = get_u64(o, "guest_phys_addr"),
		.memory_size = get_u64(o, "memory_size"),
		.userspace_addr = resolve(find(o, "userspace_addr")),
	};

	if (ioctl(vmm.vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
		answer_errno(errno);
		return;
	}
	track_slot(region.slot, region.memory_size);
	answer_errno(0);
}

/* A descriptor number that is not open, so that the kernel's fget() fails with EBADF: how a
 * trace's integer guest_memfd, or a name whose creation failed, reaches KVM. */
static int closed_descriptor(void)
{
	int fd = 4096;

	while (fcntl(fd, F_GETFD) != -1 || errno != EBADF)
		fd++;
	return fd;
}

/* The descriptor a `guest_memfd` field stands for. */
static int guest_memfd(const struct value *v)
{
	for (size_t i = 0; v && v->kind == V_STRING && i < vmm.ngmems; i++)
		if (strcmp(vmm.gmems[i].name, v->string) == 0)
			return vmm.gmems[i].fd;
	return closed_descriptor();
}

/* KVM_SET_USER_MEMORY_REGION2: the v1 fields and the guest_memfd binding; pads stay zero. */
static void op_set_user_memory_region2(const struct object *o)
{
	struct kvm_userspace_memory_region2 region = {
		.slot = (uint32_t)get_u64(o, "slot"),
		.flags = (uint32_t)get_u64(o, "flags"),
		.guest_phys_addr = get_u64(o, "guest_phys_addr"),
		.memory_size = get_u64(o, "memory_size"),
		.userspace_addr = resolve(find(o, "userspace_addr")),
		.guest_memfd_offset = get_u64(o, "guest_memfd_offset"),
		.guest_memfd = (uint32_t)guest_memfd(find(o, "guest_memfd")),
	};

	if (ioctl(vmm.vm_fd, KVM_SET_USER_MEMORY_REGION2, &region) < 0) {
		answer_errno(errno);
		return;
	}
	track_slot(region.slot, region.memory_size);
	answer_errno(0);
}

/* KVM_CREATE_GUEST_MEMFD: on success the file is known as `gmem`. */
static void op_create_guest_memfd(const struct object *o)
{
	struct kvm_create_guest_memfd create = {
		.size = get_u64(o, "size"),
		.flags = get_u64(o, "flags"),
	};
	int fd = ioctl(vmm.vm_fd, KVM_CREATE_GUEST_MEMFD, &create);

	if (fd < 0) {
		answer_errno(errno);
		return;
	}
	vmm.gmems = grow(vmm.gmems, vmm.ngmems, sizeof(*vmm.gmems));
	snprintf(vmm.gmems[vmm.ngmems].name, MAX_STRING, "%s", get_string(o, "gmem"));
	vmm.gmems[vmm.ngmems++].fd = fd;
	answer_errno(0);
}

/* KVM_CREATE_VCPU: the vCPU is only created (this example runs no guest). */
static void op_create_vcpu(const struct object *o)
{
	int fd = ioctl(vmm.vm_fd, KVM_CREATE_VCPU, (unsigned long)get_u64(o, "id"));

	if (fd < 0) {
		answer_errno(errno);
		return;
	}
	vmm.vcpu_fds = grow(vmm.vcpu_fds, vmm.nvcpus, sizeof(*vmm.vcpu_fds));
	vmm.vcpu_fds[vmm.nvcpus++] = fd;
	answer_errno(0);
}

/* KVM_RESET_DIRTY_RINGS: {"errno": 0, "result": entries reset}. */
static void op_reset_dirty_rings(const struct object *o)
{
	int reset = ioctl(vmm.vm_fd, KVM_RESET_DIRTY_RINGS, 0UL);

	(void)o;
	if (reset < 0)
		answer_errno(errno);
	else
		printf("{\"errno\": 0, \"result\": %d}\n", reset);
}

/* KVM_GET_DIRTY_LOG: the bitmap is ALIGN(npages, 64) / 8 bytes, printed as u64 words. A slot
 * this program does not know still goes to the kernel, for its errno. */
static void op_get_dirty_log(const struct object *o)
{
	uint32_t id = (uint32_t)get_u64(o, "slot");
	struct slot *s = find_slot(id);
	size_t nwords = s ? (s->npages + 63) / 64 : 1;
	struct guarded buffer;
	uint64_t *words = guarded_alloc(&buffer, nwords * 8);
	struct kvm_dirty_log log = {.slot = id};

	if (!words) {
		answer_errno(ENOMEM);
		return;
	}
	log.dirty_bitmap = (uint64_t)(uintptr_t)words;
	if (ioctl(vmm.vm_fd, KVM_GET_DIRTY_LOG, &log) < 0) {
		answer_errno(errno);
	} else {
		printf("{\"errno\": 0, \"bitmap\": [");
		for (size_t i = 0; i < nwords; i++)
			printf(i ? ", %" PRIu64 : "%" PRIu64, words[i]);
		printf("]}\n");
	}
	guarded_free(&buffer);
}

/* KVM_CLEAR_DIRTY_LOG: word 0 of `bitmap` covers first_page; missing words are 0. The kernel
 * reads ALIGN(num_pages, 64) / 8 bytes, but only once the range fits the slot: a request it
 * will refuse gets just the words the operation carries. */
static void op_clear_dirty_log(const struct object *o)
{
	uint32_t id = (uint32_t)get_u64(o, "slot");
	uint32_t num_pages = (uint32_t)get_u64(o, "num_pages");
	const struct value *bitmap = find(o, "bitmap");
	size_t given = bitmap && bitmap->kind == V_ARRAY ? bitmap->count : 0;
	size_t nwords = ((size_t)num_pages + 63) / 64;
	struct slot *s = find_slot(id);
	struct guarded buffer;
	uint64_t *words;
	struct kvm_clear_dirty_log clear = {
		.slot = id,
		.num_pages = num_pages,
		.first_page = get_u64(o, "first_page"),
	};

	if ((!s || num_pages > s->npages) && given < nwords)
		nwords = given;
	words = guarded_alloc(&buffer, nwords * 8);
	if (!words) {
		answer_errno(ENOMEM);
		return;
	}
	/* The buffer is fresh anonymous memory: the words past `given` are already 0. */
	for (size_t i = 0; i < nwords && i < given; i++)
		words[i] = bitmap->words[i];
	clear.dirty_bitmap = (uint64_t)(uintptr_t)words;
	answer_errno(ioctl(vmm.vm_fd, KVM_CLEAR_DIRTY_LOG, &clear) < 0 ? errno : 0);
	guarded_free(&buffer);
}

/* The number of a capability name, or -1 for a name this program does not know. */
static long capability_number(const char *name)
{
	for (size_t i = 0; i < sizeof(capabilities) / sizeof(capabilities[0]); i++)
		if (strcmp(capabilities[i].name, name) == 0)
			return (long)capabilities[i].number;
	return -1;
}

/* KVM_CHECK_EXTENSION on the VM: {"errno": 0, "result": N}. */
static void op_check_extension(const struct object *o)
{
	long cap = capability_number(get_string(o, "cap"));
	int result;

	if (cap < 0) {
		answer_errno(EINVAL);
		return;
	}
	result = ioctl(vmm.vm_fd, KVM_CHECK_EXTENSION, (unsigned long)cap);
	if (result < 0)
		answer_errno(errno);
	else
		printf("{\"errno\": 0, \"result\": %d}\n", result);
}

/* KVM_SET_NR_MMU_PAGES: the limit is the ioctl's argument itself, not a pointer. */
static void op_set_nr_mmu_pages(const struct object *o)
{
	unsigned long pages = (unsigned long)get_u64(o, "nr_mmu_pages");

	answer_errno(ioctl(vmm.vm_fd, KVM_SET_NR_MMU_PAGES, pages) < 0 ? errno : 0);
}

/* KVM_ENABLE_CAP, for KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 only: the dirty-ring capabilities
 * would need the ring mapped from each vCPU, which this example does not do. */
static void op_enable_cap(const struct object *o)
{
	const struct value *args = find(o, "args");
	struct kvm_enable_cap enable = {
		.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
		.flags = (uint32_t)get_u64(o, "flags"),
	};

	if (capability_number(get_string(o, "cap")) != KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) {
		answer_unsupported("enable_cap");
		return;
	}
	for (size_t i = 0; args && args->kind == V_ARRAY && i < args->count && i < 4; i++)
		enable.args[i] = args->words[i];
	answer_errno(ioctl(vmm.vm_fd, KVM_ENABLE_CAP, &enable) < 0 ? errno : 0);
}

static const struct {
	const char *name;
	void (*apply)(const struct object *);
} operations[] = {
	{"mmap", op_mmap},
	{"set_user_memory_region", op_set_user_memory_region},
	{"set_user_memory_region2", op_set_user_memory_region2},
	{"create_guest_memfd", op_create_guest_memfd},
	{"create_vcpu", op_create_vcpu},
	{"reset_dirty_rings", op_reset_dirty_rings},
	{"get_dirty_log", op_get_dirty_log},
	{"clear_dirty_log", op_clear_dirty_log},
	{"check_extension", op_check_extension},
	{"set_nr_mmu_pages", op_set_nr_mmu_pages},
	{"enable_cap", op_enable_cap},
};

static void apply(const struct object *o)
{
	const char *op = get_string(o, "op");

	for (size_t i = 0; i < sizeof(operations) / sizeof(operations[0]); i++) {
		if (strcmp(operations[i].name, op) == 0) {
			operations[i].apply(o);
			return;
		}
	}
	answer_unsupported(op);
}

/* ------------------------------------------------------------------ set-up and the loop */

/* The header names the platform; this program drives this machine's x86-64 KVM. */
static void check_header(const struct object *header, struct reader *r)
{
	const char *platform = get_string(header, "platform");

	if (strcmp(get_string(header, "format"), "kvmspec-trace/1") != 0)
		protocol_error(r, "the first line must be the header {\"format\": \"kvmspec-trace/1\", ...}");
	if (strncmp(platform, "x86_64", 6) != 0) {
		fprintf(stderr, "kvm-c-target: platform %s is not supported (x86-64 only)\n", platform);
		exit(3);
	}
}

/* Open /dev/kvm, check the API version, create one VM of the default type. The system fd
 * is closed again: the VM keeps KVM alive. */
static void create_vm(void)
{
	int kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);

	if (kvm_fd < 0) {
		fprintf(stderr, "kvm-c-target: /dev/kvm: %s\n", strerror(errno));
		exit(3);
	}
	if (ioctl(kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
		fprintf(stderr, "kvm-c-target: /dev/kvm: KVM API version is not %d\n", KVM_API_VERSION);
		exit(3);
	}
	vmm.vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0UL);
	if (vmm.vm_fd < 0) {
		fprintf(stderr, "kvm-c-target: KVM_CREATE_VM: %s\n", strerror(errno));
		exit(3);
	}
	close(kvm_fd);
}

/* Close every vCPU, guest_memfd and the VM, unmap every region: the exit would do it too,
 * but a VMM that cleans up is the example to follow. */
static void release(void)
{
	for (size_t i = 0; i < vmm.nvcpus; i++)
		close(vmm.vcpu_fds[i]);
	for (size_t i = 0; i < vmm.ngmems; i++)
		close(vmm.gmems[i].fd);
	if (vmm.vm_fd >= 0)
		close(vmm.vm_fd);
	for (size_t i = 0; i < vmm.nregions; i++)
		munmap((void *)(uintptr_t)vmm.regions[i].address, vmm.regions[i].size);
	free(vmm.vcpu_fds);
	free(vmm.gmems);
	free(vmm.regions);
	free(vmm.slots);
}

static void print_errno_names(void)
{
	for (int code = 1; code <= 200; code++) {
		printf("%d {", code);
		print_errno_field(code);
		printf("}\n");
	}
}

int main(int argc, char **argv)
{
	struct reader r = {0};
	struct object o;
	char *line = NULL;
	size_t capacity = 0;
	bool header_seen = false;

	if (argc == 2 && strcmp(argv[1], "--errno-names") == 0) {
		print_errno_names();
		return 0;
	}
	if (argc != 1) {
		fprintf(stderr, "usage: %s   (trace operations on stdin, observations on stdout)\n",
			argv[0]);
		return 2;
	}
	while (getline(&line, &capacity, stdin) >= 0) {
		r.text = line;
		r.pos = 0;
		r.line++;
		skip_space(&r);
		if (r.text[r.pos] == '\n' || r.text[r.pos] == '\0' || r.text[r.pos] == '#')
			continue; /* blank lines and comments, as in a trace file */
		read_object(&r, &o);
		if (!header_seen) {
			check_header(&o, &r);
			create_vm();
			header_seen = true;
		} else {
			apply(&o);
		}
		free_object(&o);
		fflush(stdout);
	}
	free(line);
	release();
	return 0;
}
