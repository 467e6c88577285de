/* spec_prompts.c - see spec_prompts.h. Workload (a) has four kinds of task, four prompts each:
 * labelling a 40-line list with one of five labels, JSON records with enum fields, rewriting a list
 * of dates, numbers, times or amounts, and copying a text with small edits. The 40-line lists are
 * kept as comma-separated items (or one sentence a line) and numbered when the prompt is built. */
#include "spec_prompts.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *labels;  /* the five labels, as the instruction names them */
    const char *example; /* an answer line for the first item */
    const char *items;   /* 40 items, separated by sep */
    char sep;
} label_task_t;

static const label_task_t label_tasks[] = {
    {"mammal, bird, fish, reptile, insect", "1. dog: mammal",
     "dog,eagle,salmon,cobra,ant,horse,sparrow,tuna,turtle,bee,whale,owl,shark,lizard,beetle,rabbit,penguin,trout,"
     "crocodile,butterfly,elephant,parrot,cod,gecko,mosquito,tiger,swan,carp,iguana,wasp,bat,pigeon,herring,"
     "alligator,grasshopper,goat,crow,mackerel,chameleon,ladybug",
     ','},
    {"fruit, vegetable, grain, dairy, meat", "1. apple: fruit",
     "apple,carrot,rice,cheese,beef,banana,spinach,wheat,yogurt,chicken,mango,broccoli,oats,butter,pork,cherry,onion,"
     "barley,milk,lamb,grape,potato,corn,cream,turkey,peach,cabbage,rye,kefir,duck,pear,lettuce,millet,ricotta,veal,"
     "plum,celery,quinoa,brie,venison",
     ','},
    {"Africa, Asia, Europe, Americas, Oceania", "1. Kenya: Africa",
     "Kenya,Japan,France,Brazil,Fiji,Egypt,India,Spain,Canada,Samoa,Ghana,Vietnam,Norway,Peru,Tonga,Nigeria,Thailand,"
     "Poland,Mexico,Australia,Morocco,Nepal,Greece,Chile,Vanuatu,Ethiopia,Korea,Ireland,Cuba,Kiribati,Senegal,Laos,"
     "Austria,Colombia,Palau,Tanzania,Mongolia,Portugal,Jamaica,Nauru",
     ','},
    {"billing, shipping, account, technical, other", "1. billing",
     "I was charged twice this month.\nMy parcel has not arrived yet.\nI forgot my password.\n"
     "The app crashes when I open it.\nDo you have a store in Berlin?\nWhy is my invoice higher than usual?\n"
     "The tracking number does not work.\nHow do I change my email address?\nThe website shows an error 500.\n"
     "Can I bring my dog to your shop?\nPlease refund the last payment.\nThe box arrived damaged.\n"
     "I want to delete my profile.\nVideos will not load on my phone.\nWhat are your opening hours?\n"
     "My card was declined at checkout.\nCan you deliver to Norway?\nI cannot log in after the update.\n"
     "The printer driver fails to install.\nWho founded your company?\nI need a copy of my receipt.\n"
     "The courier left the package outside.\nPlease merge my two accounts.\nSync stopped working yesterday.\n"
     "Do you sponsor local events?\nCan I pay by bank transfer?\nMy order went to my old address.\n"
     "How do I turn on two-step login?\nThe screen goes black after a minute.\nIs there a student discount?\n"
     "The discount code was not applied.\nHow long does express delivery take?\nMy username is already taken.\n"
     "Notifications arrive twice.\nI would like to give some feedback.\nYou charged tax I should not pay.\n"
     "Part of my order is missing.\nI was locked out of my account.\nThe search button does nothing.\n"
     "Are you hiring this summer?",
     '\n'},
};

static const char *const json_prompts[] = {
    "Turn each order below into a JSON object on its own line with the fields \"id\" (a number), \"status\" (one "
    "of \"pending\", \"shipped\", \"delivered\", \"cancelled\") and \"priority\" (one of \"low\", \"normal\", "
    "\"high\"). Write only the JSON lines.\n\n"
    "order 1041 was shipped, rush order\norder 1042 is waiting for payment, no rush\n"
    "order 1043 reached the customer, normal\norder 1044 was cancelled by the buyer, rush order\n"
    "order 1045 left the warehouse today, normal\norder 1046 is not paid yet, rush order\n"
    "order 1047 was delivered on Monday, no rush\norder 1048 was cancelled, normal\n"
    "order 1049 is on the truck, no rush\norder 1050 is waiting in the queue, normal\n"
    "order 1051 was delivered to the door, rush order\norder 1052 was refunded and cancelled, no rush\n",

    "Write one JSON object per line for each employee below, with the fields \"name\", \"department\" (one of "
    "\"sales\", \"engineering\", \"support\", \"finance\") and \"level\" (one of \"junior\", \"senior\", \"lead\"). "
    "Write only the JSON lines.\n\n"
    "Maria Lopez, senior software engineer\nDavid Chen, junior accountant\nAmara Okafor, head of the sales team\n"
    "Lukas Weber, junior help desk agent\nSofia Rossi, senior sales representative\nKenji Sato, lead engineer\n"
    "Emma Dubois, junior sales assistant\nOmar Haddad, senior financial analyst\nNina Petrova, support team lead\n"
    "Jacob Miller, junior developer\nLeila Karimi, head of finance\nPaul Novak, senior support specialist\n",

    "Convert each bug report below to a JSON object on its own line with the fields \"id\", \"severity\" (one of "
    "\"minor\", \"major\", \"critical\") and \"state\" (one of \"open\", \"in_progress\", \"closed\"). Write only "
    "the JSON lines.\n\n"
    "BUG-301: typo on the login page, nobody is on it yet\nBUG-302: data loss on save, being fixed now\n"
    "BUG-303: slow search results, fixed last week\nBUG-304: server crash at midnight, just reported\n"
    "BUG-305: wrong icon color, fixed\nBUG-306: payments fail for some users, someone is working on it\n"
    "BUG-307: tooltip cut off, not started\nBUG-308: memory leak in the worker, fix in review\n"
    "BUG-309: all accounts locked, resolved\nBUG-310: export misses one column, open\n"
    "BUG-311: button misaligned on tablets, closed\nBUG-312: security hole in uploads, being patched\n",

    "For each book below write a JSON object on its own line with the fields \"title\", \"genre\" (one of "
    "\"fiction\", \"science\", \"history\", \"poetry\") and \"format\" (one of \"hardcover\", \"paperback\", "
    "\"ebook\"). Write only the JSON lines.\n\n"
    "The Silent Orchard, a novel, paperback\nStars and Atoms, popular physics, ebook\n"
    "The Fall of Carthage, ancient history, hardcover\nSalt and Willow, collected poems, paperback\n"
    "Tides of Memory, a novel, ebook\nThe Living Cell, biology, hardcover\nEmpires of Silk, history, ebook\n"
    "Night Verses, poems, hardcover\nThe Clockmaker's Daughter, a novel, hardcover\n"
    "Chemistry for Everyone, science, paperback\nThe Long Winter War, history, paperback\n"
    "Small Hours, poetry, ebook\n",
};

static const char *const rewrite_prompts[] = {
    "Rewrite each date below in the format YYYY-MM-DD, one per line, in the same order, with nothing else.\n\n"
    "March 3, 2021\nJuly 19, 1998\nJanuary 1, 2000\nOctober 31, 2015\nFebruary 14, 2023\nAugust 8, 1988\n"
    "December 25, 2010\nApril 30, 2019\nJune 6, 1944\nSeptember 12, 2005\nNovember 2, 2022\nMay 17, 1995\n"
    "March 21, 2018\nJuly 4, 1976\nJanuary 28, 2007\nOctober 9, 2012\nFebruary 29, 2020\nAugust 23, 2001\n"
    "December 7, 1999\nApril 11, 2016\n",

    "Write each of these numbers in digits, one per line, in the same order, with nothing else.\n\n"
    "twelve\nthree hundred and four\nforty-five\nninety-nine\none thousand two hundred\nseventy\n"
    "six hundred and eleven\neighteen\ntwo thousand and twenty\nfifty-three\nfive hundred\nthirty-one\n"
    "eight hundred and eighty\nsixty-seven\nnine thousand\ntwenty-two\nfour hundred and sixteen\n"
    "eleven\nseven hundred and five\nninety\n",

    "Rewrite each time below in the 24-hour format HH:MM, one per line, in the same order, with nothing else.\n\n"
    "7:15 pm\n9:30 am\n12:00 pm\n11:45 pm\n6:05 am\n3:20 pm\n12:30 am\n8:50 pm\n10:10 am\n4:40 pm\n"
    "1:15 am\n5:55 pm\n2:25 pm\n11:00 am\n9:45 pm\n7:35 am\n6:50 pm\n3:05 am\n10:30 pm\n4:15 am\n",

    "Each line below is an amount in cents. Rewrite each one in dollars with a dollar sign and two decimals "
    "(for example 1250 becomes $12.50), one per line, in the same order, with nothing else.\n\n"
    "1250\n399\n10000\n75\n2049\n125000\n5\n860\n31415\n999\n4200\n18\n70707\n1001\n250\n64000\n333\n"
    "12\n5678\n90\n",
};

static const char *const copy_prompts[] = {
    "Copy the text below exactly, but replace the name Tom with Sara everywhere. Write out the whole text.\n\n"
    "Tom woke up early on Saturday. Tom made coffee, fed the cat and opened the window to let in the cool air. "
    "After breakfast Tom walked to the market, where Tom bought apples, bread and a bunch of yellow flowers. On "
    "the way home Tom met an old friend from school, and they talked for an hour about the summer they spent by "
    "the lake. In the evening Tom cooked soup, read a few pages of a book and went to bed before ten.\n",

    "Here is a configuration file. Write the whole file again with the port changed to 8080 and the host "
    "changed to localhost; keep every other line exactly as it is.\n\n"
    "[server]\nhost = 10.0.0.12\nport = 9000\nworkers = 4\ntimeout_s = 30\nlog_level = info\n\n"
    "[database]\nname = inventory\nuser = app\npool_size = 16\nretry = 3\n\n"
    "[cache]\nenabled = true\nsize_mb = 256\nttl_s = 600\n\n[paths]\ndata = /var/lib/app\nlogs = /var/log/app\n",

    "Write this to-do list again, marking items 3, 7 and 11 as done by changing their [ ] to [x]. Keep every "
    "other line exactly as it is.\n\n"
    "1. [ ] buy milk\n2. [ ] call the plumber\n3. [ ] pay the electricity bill\n4. [ ] water the plants\n"
    "5. [ ] return the library books\n6. [ ] book a dentist appointment\n7. [ ] wash the car\n"
    "8. [ ] send the birthday card\n9. [ ] fix the bike light\n10. [ ] clean the oven\n"
    "11. [ ] renew the passport\n12. [ ] sort the old photos\n13. [ ] order printer ink\n"
    "14. [ ] take out the recycling\n",

    "Correct the spelling mistakes in the paragraph below and write the whole corrected paragraph.\n\n"
    "The libary opens at nine oclock every mornign exept on sundays. Visiters can borow up to five books at a "
    "time, and they must retrun them within two weks. The reading room on the secnd floor is quite, with large "
    "windows and confortable chairs. Childrens books are kept on the ground floor, next to a smal play area. "
    "Every frist Tuesday of the month the libary hosts a talk by a local auther.\n",
};

static const char *const chat_prompts[] = {
    "What are some tips for staying focused while working from home?",
    "Explain how a rainbow forms.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What should I check when buying a used bicycle?",
    "Why do leaves change color in autumn?",
    "Give me a simple recipe for vegetable soup.",
    "How does a refrigerator keep food cold?",
    "What are the benefits of learning a second language?",
};

#define COUNT(a)        ((int)(sizeof(a) / sizeof((a)[0])))
#define SMALL_SET_KINDS 4
/* spec_prompt_text deals the kinds round-robin, so each has as many prompts. */
_Static_assert(COUNT(label_tasks) == COUNT(json_prompts) && COUNT(json_prompts) == COUNT(rewrite_prompts) &&
                   COUNT(rewrite_prompts) == COUNT(copy_prompts),
               "workload (a) needs as many prompts of each kind");

const char *spec_workload_name(spec_workload_t w)
{
    return w == SPEC_WORKLOAD_CHAT ? "chat" : "small-set";
}

int spec_prompt_count(spec_workload_t w)
{
    return w == SPEC_WORKLOAD_CHAT
               ? COUNT(chat_prompts)
               : COUNT(label_tasks) + COUNT(json_prompts) + COUNT(rewrite_prompts) + COUNT(copy_prompts);
}

/* The instruction, then the items numbered one a line. */
static char *label_prompt(const label_task_t *t)
{
    const size_t cap = strlen(t->items) * 2 + 512;
    char *out = malloc(cap);
    if (!out) return NULL;
    size_t n = (size_t)snprintf(out, cap,
                                "Label each line of the list below with one of these five labels: %s. Answer with "
                                "one line per item, in the form \"%s\", and nothing else.\n\n",
                                t->labels, t->example);
    int line = 1;
    for (const char *p = t->items; *p;) {
        const char *end = strchr(p, t->sep);
        const size_t len = end ? (size_t)(end - p) : strlen(p);
        n += (size_t)snprintf(out + n, cap - n, "%d. %.*s\n", line++, (int)len, p);
        p += len + (end ? 1 : 0);
    }
    return out;
}

char *spec_prompt_text(spec_workload_t w, int i)
{
    if (w == SPEC_WORKLOAD_CHAT) return i >= 0 && i < COUNT(chat_prompts) ? strdup(chat_prompts[i]) : NULL;
    if (i < 0 || i >= spec_prompt_count(w)) return NULL;
    const int k = i / SMALL_SET_KINDS;
    switch (i % SMALL_SET_KINDS) {
    case 0:
        return label_prompt(&label_tasks[k]);
    case 1:
        return strdup(json_prompts[k]);
    case 2:
        return strdup(rewrite_prompts[k]);
    default:
        return strdup(copy_prompts[k]);
    }
}
