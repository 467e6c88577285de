/* spec_prompts.c - see spec_prompts.h. Workload (a) has four kinds of task, four prompts each:
 * labelling a 40-line list with one of five labels, JSON records with enum fields, rewriting a list
 * of dates, numbers, times or amounts, and copying a text with small edits. The 40-line lists are
 * kept as comma-separated items (or one sentence a line) and numbered when the prompt is built.
 *
 * The constrained workloads keep each task as data (the labels and the list; the record's fields,
 * enums, bounds and the list), from which the prompt, the constraint (a regex, a JSON Schema) and
 * the independent check of an answer are all built, so the three cannot drift apart. */
#include "spec_prompts.h"

#include <cjson/cJSON.h>
#include <regex.h>
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

/* ---- (c) labels: each line of a 40-line list gets one of five labels, "N. label" a line ---- */

#define LABEL_LINES 40

typedef struct {
    const char *what;      /* what the lines are, and what the label says of them */
    const char *labels[5]; /* lowercase letters only, none a prefix of another */
    const char *lines;     /* LABEL_LINES lines, '\n'-separated */
} cons_label_task_t;

static const cons_label_task_t cons_label_tasks[] = {
    {"the sentiment of each product review",
     {"positive", "negative", "neutral", "mixed", "unclear"},
     "The battery lasts all day and charges quickly.\nIt stopped working after two days.\n"
     "The parcel came on a Tuesday.\nLovely screen, but the speakers are weak.\nHmm, we will see.\n"
     "Best purchase I made this year.\nThe handle snapped off the first time I used it.\nIt is blue.\n"
     "Comfortable shoes, though they run a size small.\nNot sure what to think yet.\n"
     "The staff were friendly and the room was spotless.\nCold food and a rude waiter.\n"
     "The manual has twelve pages.\nFast delivery, but one cup was chipped.\nWell, it is certainly a kettle.\n"
     "My kids love this game.\nTotal waste of money.\nThe box contains a charger and a cable.\n"
     "Tastes great, although the portion was tiny.\nI might need more time with it.\n"
     "Setup took two minutes and everything just worked.\nThe zipper broke on day one.\n"
     "Available in three sizes.\nGood camera, terrible battery.\nInteresting choice of colors.\n"
     "Would happily buy it again.\nIt smells like burnt plastic.\nThe store opens at nine.\n"
     "Quiet and powerful, if a little heavy.\nI have no idea how to feel about this.\n"
     "Exceeded every expectation.\nCustomer service never replied.\nIt weighs about two kilograms.\n"
     "Soft fabric, but the seams came loose.\nCould be worse, could be better, who knows.\n"
     "A delightful little book.\nThe app keeps logging me out.\nShipped from a warehouse in Ohio.\n"
     "Beautiful design, awkward buttons.\nAsk me again next month."},
    {"the topic of each news headline",
     {"sports", "politics", "science", "business", "culture"},
     "Local team wins the championship in overtime\nParliament passes new budget after long debate\n"
     "Astronomers spot water vapor on a distant planet\nCoffee chain opens its 500th store\n"
     "Museum unveils a lost painting by a Dutch master\nStar striker signs a three-year contract\n"
     "Mayor announces plan to cut city taxes\nNew vaccine shows promise in early trials\n"
     "Car maker reports record quarterly profits\nFilm festival awards top prize to first-time director\n"
     "Marathon runner breaks the course record\nSenate rejects proposed election reform\n"
     "Scientists map the brain of a fruit fly\nBank raises interest rates for the second time\n"
     "Novelist wins the national book award\nTennis champion retires at 34\n"
     "President meets foreign leaders at summit\nAncient bacteria revived from Arctic ice\n"
     "Tech startup raises 40 million in funding\nOpera house celebrates its centenary\n"
     "Cyclists battle rain on the mountain stage\nOpposition party elects a new leader\n"
     "Telescope captures the birth of a star\nAirline cuts prices on transatlantic flights\n"
     "Jazz legend releases first album in a decade\nSwimmer sets world record in 200 meters\n"
     "Government unveils new climate policy\nResearchers grow teeth in the laboratory\n"
     "Retail sales fall for the third month\nStreet artists transform the old harbor\n"
     "Rugby coach resigns after heavy defeat\nVoters head to the polls on Sunday\n"
     "Physicists measure the mass of the neutrino\nOil prices climb after supply cuts\n"
     "Poetry slam draws record crowd\nGoalkeeper saves three penalties in shootout\n"
     "Minister resigns over expenses scandal\nRobot learns to fold laundry\n"
     "Shipping firm merges with rival\nBallet company tours South America"},
    {"the weather of each day described",
     {"sunny", "rainy", "cloudy", "snowy", "windy"},
     "Clear blue sky from morning to evening.\nHeavy showers all afternoon.\n"
     "A thick grey blanket hid the sun all day.\nFresh powder covered the streets by noon.\n"
     "Gusts strong enough to knock over bins.\nBright sunshine and not a cloud in sight.\n"
     "Drizzle that never quite stopped.\nOvercast, dull and dry.\nFlakes kept falling through the night.\n"
     "The kites were flying high on the beach.\nHot and bright, perfect for the pool.\n"
     "Umbrellas everywhere on the way to work.\nThe sky stayed white and flat for hours.\n"
     "Children built a snowman in the park.\nTrees bent and leaves flew across the road.\n"
     "Sunglasses weather all weekend.\nPuddles formed on every corner.\nNo sun, no rain, just grey.\n"
     "A blizzard closed the mountain pass.\nThe ferry was cancelled because of the gale.\n"
     "Long golden afternoon at the lake.\nA downpour soaked the football pitch.\n"
     "Low clouds hung over the hills.\nIcy flakes drifted past the window.\nHats blew off on the bridge.\n"
     "The terrace cafe was full of people in the sun.\nThunderstorms rolled in after lunch.\n"
     "A gloomy sky but the ground stayed dry.\nSkiers were delighted with a fresh fall overnight.\n"
     "The wind turbines spun at full speed.\nWarm rays through the kitchen window.\n"
     "Rain hammered the roof all night.\nThe sun never broke through the cover.\n"
     "Sledges came out for the first time this winter.\n"
     "Sailing boats raced across the bay in a stiff breeze.\nA cloudless day at the seaside.\n"
     "Wet boots and a dripping coat.\nA heavy grey ceiling over the city.\n"
     "Snowploughs worked through the morning.\nThe washing line spun like a propeller."},
    {"how urgent each message is",
     {"urgent", "high", "normal", "low", "spam"},
     "The server room is on fire, call someone now.\nPlease review the contract before Friday.\n"
     "Lunch menu for next week is attached.\nWhenever you have time, could you tidy the wiki?\n"
     "You have won a free cruise, click here.\nThe production database is down for all customers.\n"
     "The client wants the revised quote by tomorrow morning.\nReminder: team meeting on Thursday at ten.\n"
     "No rush, but the old printer could be recycled.\nCheap watches, best prices, buy today.\n"
     "A water pipe burst above the office, everything is flooding.\n"
     "The board needs the report by end of day.\nHere are the notes from yesterday's call.\n"
     "Someday we should rename the shared folder.\n"
     "Congratulations, your account has been selected for a prize.\n"
     "Payments are failing on the website right now.\n"
     "Can you finish the slides before the investor meeting on Monday?\n"
     "The kitchen will be cleaned on Wednesday.\nIf you get a chance, update your profile photo.\n"
     "Earn money from home with this one trick.\n"
     "A customer is threatening to sue unless we answer in an hour.\n"
     "The auditors arrive tomorrow and need the invoices.\nParking spaces are reassigned next month.\n"
     "Maybe next quarter we can try a new coffee brand.\n"
     "Your parcel is waiting, pay a small fee to release it.\nSomeone is locked in the lift.\n"
     "Please approve the budget change this week.\nThe holiday calendar has been updated.\n"
     "At some point, please archive your old emails.\nHot singles in your area want to meet you.\n"
     "All laptops are showing a ransom message.\nThe release candidate needs sign-off today.\n"
     "New starters join on the first of the month.\nThe plant in reception could use some water.\n"
     "Claim your inheritance from a distant relative.\nThe fire alarm is sounding in building B.\n"
     "Legal needs your comments on the draft by Wednesday.\nThe newsletter goes out on Friday as usual.\n"
     "Sometime this year we could repaint the meeting room.\nLimited offer: double your bitcoin in a day."},
};

/* ---- (d) json: an array of records, one per line of a list, with a string, two enums and an integer ---- */

#define JSON_ITEMS 8

typedef struct {
    const char *noun;               /* what a line of the list is */
    const char *str_key, *str_hint; /* a string of at most str_max characters */
    int str_max;
    const char *enum_key, *enum_vals[4]; /* one of four strings */
    const char *int_key, *int_hint;      /* an integer in [int_min, int_max] */
    int int_min, int_max;
    const char *enum2_key, *enum2_vals[4]; /* one of four strings */
    const char *example;                   /* a record for an item not in the list */
    const char *lines;                     /* JSON_ITEMS lines, '\n'-separated */
} cons_json_task_t;

static const cons_json_task_t cons_json_tasks[] = {
    {"task",
     "name",
     "the task in a few words",
     40,
     "status",
     {"todo", "doing", "done", "blocked"},
     "priority",
     "1 lowest, 5 highest",
     1,
     5,
     "category",
     {"home", "work", "health", "errands"},
     "{\"name\":\"Water the plants\",\"status\":\"todo\",\"priority\":2,\"category\":\"home\"}",
     "Fix the leaking kitchen tap, started yesterday, fairly urgent\n"
     "Send the quarterly report to my manager, finished this morning, very important\n"
     "Book a dentist check-up, not started, can wait\nBuy stamps at the post office, not started, minor\n"
     "Renew the gym membership, waiting for the new card, medium\n"
     "Prepare slides for the client meeting, in progress, urgent\n"
     "Pick up the dry cleaning, done on Monday, minor\nClean out the garage, blocked by the rain, low"},
    {"order",
     "customer",
     "the customer's name",
     32,
     "status",
     {"pending", "shipped", "delivered", "cancelled"},
     "items",
     "the number of items",
     1,
     20,
     "channel",
     {"web", "store", "phone", "app"},
     "{\"customer\":\"Ada Brown\",\"status\":\"pending\",\"items\":1,\"channel\":\"web\"}",
     "Maria Lopez ordered 3 items on the website, shipped yesterday\n"
     "Tom Becker bought 1 item in the store, already delivered\n"
     "Yuki Tanaka ordered 12 items by phone, still waiting for payment\n"
     "Omar Haddad ordered 2 items in the app, cancelled by the buyer\n"
     "Lena Fischer ordered 5 items on the website, delivered on Friday\n"
     "Ravi Patel ordered 7 items in the app, on the truck now\n"
     "Chloe Martin ordered 1 item by phone, cancelled\n"
     "Sam Okoye ordered 20 items in the store, not paid yet"},
    {"bug report",
     "title",
     "a short title",
     48,
     "severity",
     {"minor", "major", "critical", "blocker"},
     "priority",
     "1 lowest, 5 highest",
     1,
     5,
     "state",
     {"open", "in_progress", "review", "closed"},
     "{\"title\":\"Logo is blurry\",\"severity\":\"minor\",\"priority\":1,\"state\":\"open\"}",
     "Typo on the login page, nobody has looked at it\nData lost when saving large files, being fixed now\n"
     "Search takes ten seconds, fix waiting for review\nServer crashes every night at midnight, just reported\n"
     "Wrong icon color in dark mode, fixed last week\nPayments fail for some users, someone is on it\n"
     "Nobody can log in after the update, fix under review\nTooltip text cut off, closed as done"},
    {"employee",
     "name",
     "the person's name",
     32,
     "department",
     {"sales", "engineering", "support", "finance"},
     "level",
     "1 junior to 5 most senior",
     1,
     5,
     "office",
     {"berlin", "lisbon", "toronto", "remote"},
     "{\"name\":\"Jo Smith\",\"department\":\"sales\",\"level\":2,\"office\":\"berlin\"}",
     "Anna Schmidt, senior software engineer in Berlin\nDavid Chen, junior accountant working from home\n"
     "Amara Okafor, head of sales in Toronto\nLukas Weber, junior help desk agent in Lisbon\n"
     "Sofia Rossi, mid-level sales representative, remote\nKenji Sato, principal engineer in Toronto\n"
     "Nina Petrova, support team lead in Berlin\nLeila Karimi, finance analyst in Lisbon"},
};

#define COUNT(a)        ((int)(sizeof(a) / sizeof((a)[0])))
#define SMALL_SET_KINDS 4
/* spec_prompt_text deals the kinds round-robin, so each has as many prompts. */
_Static_assert(COUNT(label_tasks) == COUNT(json_prompts) && COUNT(json_prompts) == COUNT(rewrite_prompts) &&
                   COUNT(rewrite_prompts) == COUNT(copy_prompts),
               "workload (a) needs as many prompts of each kind");

const char *spec_workload_name(spec_workload_t w)
{
    static const char *const names[SPEC_WORKLOAD_COUNT] = {"small-set", "chat", "labels", "json"};
    return w >= 0 && w < SPEC_WORKLOAD_COUNT ? names[w] : "small-set";
}

int spec_prompt_count(spec_workload_t w)
{
    switch (w) {
    case SPEC_WORKLOAD_CHAT:
        return COUNT(chat_prompts);
    case SPEC_WORKLOAD_LABELS:
        return COUNT(cons_label_tasks);
    case SPEC_WORKLOAD_JSON:
        return COUNT(cons_json_tasks);
    default:
        return COUNT(label_tasks) + COUNT(json_prompts) + COUNT(rewrite_prompts) + COUNT(copy_prompts);
    }
}

bool spec_workload_constrained(spec_workload_t w)
{
    return w == SPEC_WORKLOAD_LABELS || w == SPEC_WORKLOAD_JSON;
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

/* ---- constrained workloads: prompt, constraint and check from one task ---- */

/* A string built by printing into it (open_memstream); NULL when out of memory. */
typedef struct {
    FILE *f;
    char *s;
    size_t len;
} text_t;

static bool text_open(text_t *t)
{
    *t = (text_t){0};
    return (t->f = open_memstream(&t->s, &t->len)) != NULL;
}

static char *text_close(text_t *t, bool ok)
{
    if (fclose(t->f) || !ok) {
        free(t->s);
        return NULL;
    }
    return t->s;
}

/* The lines of a '\n'-separated list, one a line, numbered "1. " ... or not. */
static void each_line(FILE *f, const char *lines, bool numbered)
{
    int line = 1;
    for (const char *p = lines; *p; line++) {
        const char *end = strchr(p, '\n');
        const int len = end ? (int)(end - p) : (int)strlen(p);
        if (numbered) fprintf(f, "%d. ", line);
        fprintf(f, "%.*s\n", len, p);
        p += len + (end ? 1 : 0);
    }
}

/* Characters (code points) of a UTF-8 string: its bytes that are not continuation bytes. */
static size_t utf8_chars(const char *s)
{
    size_t n = 0;
    for (; *s; s++) n += ((unsigned char)*s & 0xC0) != 0x80;
    return n;
}

static char *cons_label_prompt(const cons_label_task_t *t)
{
    text_t o;
    if (!text_open(&o)) return NULL;
    const char *const *l = t->labels;
    fprintf(o.f,
            "Label %s in the list below with one of these five labels: %s, %s, %s, %s, %s. For each line write "
            "its number and its label only, one line each, like this:\n1. %s\n2. %s\n\n",
            t->what, l[0], l[1], l[2], l[3], l[4], l[2], l[0]);
    each_line(o.f, t->lines, true);
    return text_close(&o, true);
}

/* The answer's format as a regular expression: "1. label\n2. label\n...40. label", a final newline
 * allowed. posix: for regcomp (anchors, a literal newline), else folio's subset (anchored anyway). */
static char *label_pattern(const cons_label_task_t *t, bool posix)
{
    text_t o;
    if (!text_open(&o)) return NULL;
    const char *nl = posix ? "\n" : "\\n";
    const char *const *l = t->labels;
    fputs(posix ? "^" : "", o.f);
    for (int i = 1; i <= LABEL_LINES; i++)
        fprintf(o.f, "%s%d\\. (%s|%s|%s|%s|%s)", i > 1 ? nl : "", i, l[0], l[1], l[2], l[3], l[4]);
    fprintf(o.f, "%s?%s", nl, posix ? "$" : "");
    return text_close(&o, true);
}

static char *cons_json_prompt(const cons_json_task_t *t)
{
    text_t o;
    if (!text_open(&o)) return NULL;
    const char *const *e = t->enum_vals, *const *e2 = t->enum2_vals;
    fprintf(o.f,
            "Turn each %s below into a JSON object with the fields \"%s\" (%s, at most %d characters), \"%s\" (one "
            "of \"%s\", \"%s\", \"%s\", \"%s\"), \"%s\" (an integer from %d to %d: %s) and \"%s\" (one of \"%s\", "
            "\"%s\", \"%s\", \"%s\"). Answer with one JSON array of the %d objects, in the order of the list, on one "
            "line and nothing else. An object looks like this:\n%s\n\n",
            t->noun, t->str_key, t->str_hint, t->str_max, t->enum_key, e[0], e[1], e[2], e[3], t->int_key, t->int_min,
            t->int_max, t->int_hint, t->enum2_key, e2[0], e2[1], e2[2], e2[3], JSON_ITEMS, t->example);
    each_line(o.f, t->lines, false);
    return text_close(&o, true);
}

static cJSON *enum_schema(const char *const vals[4])
{
    cJSON *s = cJSON_CreateObject();
    cJSON_AddStringToObject(s, "type", "string");
    cJSON_AddItemToObject(s, "enum", cJSON_CreateStringArray(vals, 4));
    return s;
}

/* An array of exactly JSON_ITEMS objects, every field required. */
static char *json_schema(const cons_json_task_t *t)
{
    cJSON *root = cJSON_CreateObject(), *item = cJSON_CreateObject(), *props = cJSON_CreateObject();
    cJSON *str = cJSON_CreateObject(), *num = cJSON_CreateObject();
    const char *required[4] = {t->str_key, t->enum_key, t->int_key, t->enum2_key};
    cJSON_AddStringToObject(str, "type", "string");
    cJSON_AddNumberToObject(str, "maxLength", t->str_max);
    cJSON_AddStringToObject(num, "type", "integer");
    cJSON_AddNumberToObject(num, "minimum", t->int_min);
    cJSON_AddNumberToObject(num, "maximum", t->int_max);
    cJSON_AddItemToObject(props, t->str_key, str);
    cJSON_AddItemToObject(props, t->enum_key, enum_schema(t->enum_vals));
    cJSON_AddItemToObject(props, t->int_key, num);
    cJSON_AddItemToObject(props, t->enum2_key, enum_schema(t->enum2_vals));
    cJSON_AddStringToObject(item, "type", "object");
    cJSON_AddItemToObject(item, "properties", props);
    cJSON_AddItemToObject(item, "required", cJSON_CreateStringArray(required, 4));
    cJSON_AddStringToObject(root, "type", "array");
    cJSON_AddItemToObject(root, "items", item);
    cJSON_AddNumberToObject(root, "minItems", JSON_ITEMS);
    cJSON_AddNumberToObject(root, "maxItems", JSON_ITEMS);
    char *s = cJSON_PrintUnformatted(root); /* NULL when any allocation above failed */
    cJSON_Delete(root);
    char *out = s ? strdup(s) : NULL;
    cJSON_free(s);
    return out;
}

char *spec_prompt_text(spec_workload_t w, int i)
{
    if (i < 0 || i >= spec_prompt_count(w)) return NULL;
    if (w == SPEC_WORKLOAD_CHAT) return strdup(chat_prompts[i]);
    if (w == SPEC_WORKLOAD_LABELS) return cons_label_prompt(&cons_label_tasks[i]);
    if (w == SPEC_WORKLOAD_JSON) return cons_json_prompt(&cons_json_tasks[i]);
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

int spec_prompt_constraint(spec_workload_t w, int i, fl_constraint_kind_t *kind, char **text)
{
    *text = NULL;
    if (!spec_workload_constrained(w) || i < 0 || i >= spec_prompt_count(w)) return -1;
    *kind = w == SPEC_WORKLOAD_LABELS ? FL_CONSTRAINT_REGEX : FL_CONSTRAINT_JSON_SCHEMA;
    *text = w == SPEC_WORKLOAD_LABELS ? label_pattern(&cons_label_tasks[i], false) : json_schema(&cons_json_tasks[i]);
    return *text ? 0 : -1;
}

/* ---- the checks, apart from folio's compiler ---- */

static bool labels_valid(const cons_label_task_t *t, const char *text, char *why, size_t cap)
{
    char *pattern = label_pattern(t, true);
    regex_t re;
    if (!pattern || regcomp(&re, pattern, REG_EXTENDED | REG_NOSUB)) {
        free(pattern);
        snprintf(why, cap, "the check's own pattern did not compile");
        return false;
    }
    free(pattern);
    const bool ok = regexec(&re, text, 0, NULL, 0) == 0;
    regfree(&re);
    if (!ok) {
        /* where: the first line that is not "N. label" */
        int line = 1;
        const char *p = text;
        for (; *p; line++) {
            const char *end = strchr(p, '\n');
            const int len = end ? (int)(end - p) : (int)strlen(p);
            char want[32];
            const int wl = snprintf(want, sizeof want, "%d. ", line);
            bool good = len > wl && !strncmp(p, want, (size_t)wl);
            if (good) {
                good = false;
                for (int k = 0; k < 5 && !good; k++)
                    good = (int)strlen(t->labels[k]) == len - wl && !strncmp(p + wl, t->labels[k], (size_t)(len - wl));
            }
            if (!good || !end) break;
            p = end + 1;
        }
        snprintf(why, cap, "does not match the %d-line format (first wrong line: %d)", LABEL_LINES, line);
    }
    return ok;
}

static bool in_enum(const cJSON *v, const char *const vals[4])
{
    if (!cJSON_IsString(v)) return false;
    for (int k = 0; k < 4; k++)
        if (!strcmp(v->valuestring, vals[k])) return true;
    return false;
}

static bool json_valid(const cons_json_task_t *t, const char *text, char *why, size_t cap)
{
    cJSON *a = cJSON_ParseWithOpts(text, NULL, true);
    bool ok = false;
    if (!a) {
        const char *at = cJSON_GetErrorPtr();
        snprintf(why, cap, "not one JSON value (at byte %td)", at ? at - text : (ptrdiff_t)-1);
    } else if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != JSON_ITEMS) {
        snprintf(why, cap, "not an array of %d items", JSON_ITEMS);
    } else {
        int i = 0;
        const cJSON *o;
        cJSON_ArrayForEach(o, a)
        {
            const cJSON *s = cJSON_GetObjectItemCaseSensitive(o, t->str_key);
            const cJSON *n = cJSON_GetObjectItemCaseSensitive(o, t->int_key);
            const char *bad = NULL;
            if (!cJSON_IsObject(o))
                bad = "not an object";
            else if (!cJSON_IsString(s) || utf8_chars(s->valuestring) > (size_t)t->str_max)
                bad = t->str_key;
            else if (!in_enum(cJSON_GetObjectItemCaseSensitive(o, t->enum_key), t->enum_vals))
                bad = t->enum_key;
            else if (!cJSON_IsNumber(n) || n->valuedouble != (double)(long long)n->valuedouble ||
                     n->valuedouble < t->int_min || n->valuedouble > t->int_max)
                bad = t->int_key;
            else if (!in_enum(cJSON_GetObjectItemCaseSensitive(o, t->enum2_key), t->enum2_vals))
                bad = t->enum2_key;
            if (bad) {
                snprintf(why, cap, "item %d: %s%s", i, bad, cJSON_IsObject(o) ? " missing or out of its bounds" : "");
                break;
            }
            i++;
        }
        ok = i == JSON_ITEMS;
    }
    cJSON_Delete(a);
    return ok;
}

bool spec_output_valid(spec_workload_t w, int i, const char *text, char *why, size_t cap)
{
    if (!spec_workload_constrained(w) || i < 0 || i >= spec_prompt_count(w)) {
        snprintf(why, cap, "%s has no constraint", spec_workload_name(w));
        return false;
    }
    return w == SPEC_WORKLOAD_LABELS ? labels_valid(&cons_label_tasks[i], text, why, cap)
                                     : json_valid(&cons_json_tasks[i], text, why, cap);
}
