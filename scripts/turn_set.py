#!/usr/bin/env python3
"""Writes tests/eval/turns.toml, the labelled turn-taking set (issue 29), to standard output:

    python3 scripts/turn_set.py > tests/eval/turns.toml

Finished questions and sentences, and sentences with a pause mid-thought at a `|` whose
silence is spread over 600-900 ms. The audio is made at evaluation time by the neural voice
(`atlas-voice eval --prompts tests/eval/turns.toml --voices piper --until-final`).
"""

complete = [
 ("fact","What is the capital of France?"),
 ("fact","How many legs does a spider have?"),
 ("fact","What color is the sky on a clear day?"),
 ("fact","How many days are there in a week?"),
 ("fact","What do bees make?"),
 ("fact","What is the opposite of hot?"),
 ("fact","Which planet is closest to the sun?"),
 ("fact","How many minutes are in an hour?"),
 ("fact","What is the largest ocean on Earth?"),
 ("fact","Who wrote Romeo and Juliet?"),
 ("fact","What is the boiling point of water in Celsius?"),
 ("fact","How many continents are there?"),
 ("fact","What language do people speak in Brazil?"),
 ("fact","What is the tallest animal in the world?"),
 ("fact","How many hours are in a day?"),
 ("fact","What is frozen water called?"),
 ("fact","Which month comes after March?"),
 ("fact","What is the capital of Japan?"),
 ("fact","How many wheels does a bicycle have?"),
 ("fact","What gas do plants take in from the air?"),
 ("request","Set a timer for ten minutes."),
 ("request","Tell me a short joke."),
 ("request","Please remind me to call my mother tomorrow."),
 ("request","Turn off the lights in the kitchen."),
 ("request","Play some relaxing music."),
 ("request","What's the weather like today?"),
 ("request","Can you spell the word necessary?"),
 ("request","Give me a recipe for pancakes."),
 ("request","Add milk to my shopping list."),
 ("request","How do I get to the train station?"),
 ("request","Book a table for two at seven tonight."),
 ("request","Read me the latest news."),
 ("request","Convert five miles to kilometers."),
 ("request","Wake me up at six thirty."),
 ("request","Send a message to Sarah saying I'm running late."),
 ("chat","I had a really good day today."),
 ("chat","Thanks, that was helpful."),
 ("chat","I'm feeling a little tired this evening."),
 ("chat","My favorite season is autumn."),
 ("chat","I just finished reading a great book."),
 ("chat","That sounds like a good plan."),
 ("chat","I don't think that's right."),
 ("chat","Can you say that again more slowly?"),
 ("chat","I'm not sure what to cook for dinner."),
 ("chat","We went hiking in the mountains last weekend."),
 ("chat","Do you like music?"),
 ("chat","What should I name my new puppy?"),
 ("chat","Good morning, how are you?"),
 ("chat","I'd like to learn how to play the guitar."),
 ("chat","Is it going to rain tomorrow?"),
 ("fact","Where is the Eiffel Tower?"),
 ("fact","What is two plus two?"),
 ("request","Tell me something interesting about octopuses."),
 ("chat","Okay, let's do that."),
 ("fact","How far away is the moon?"),
]
paused = [
 ("request","I would like to book a table | for four people on Friday evening."),
 ("request","Can you remind me to | pick up the dry cleaning after work?"),
 ("fact","What is the name of the | longest river in Africa?"),
 ("request","I need to send an email to | my manager about the meeting tomorrow."),
 ("chat","So I was thinking that maybe | we could go to the beach this weekend."),
 ("fact","How many people live in | the city of Tokyo?"),
 ("request","Could you tell me | how to make a cup of green tea?"),
 ("chat","The thing I really want to know is | whether it will be sunny on Saturday."),
 ("request","Set an alarm for | seven fifteen tomorrow morning."),
 ("fact","Who was the first person to | walk on the moon?"),
 ("request","Please add eggs, bread and | a bottle of orange juice to my list."),
 ("chat","I've been trying to decide between | a new laptop and a new phone."),
 ("fact","What is the difference between | a frog and a toad?"),
 ("request","Find me a restaurant that serves | Italian food near the river."),
 ("chat","My sister is coming to visit and | I don't know where to take her."),
 ("fact","Why is the sky | blue during the day?"),
 ("request","Play the song that goes | something like la la la in the rain."),
 ("chat","I was wondering if you could | help me plan a birthday party."),
 ("fact","How long does it take to | fly from London to New York?"),
 ("request","Turn the volume | down a little bit please."),
 ("chat","Yesterday at work my boss told me | that I might get a promotion."),
 ("fact","What is the capital city of | Australia?"),
 ("request","Call the dentist and | move my appointment to next week."),
 ("chat","I think I would prefer | the blue one over the red one."),
 ("fact","How many bones are there in | the human body?"),
 ("request","Can you explain how | a rainbow forms in simple words?"),
 ("chat","When I was a child I used to | spend every summer at my grandmother's farm."),
 ("fact","What year did | the Second World War end?"),
 ("request","Order a large pizza with | mushrooms and olives for delivery."),
 ("chat","I'm looking for a gift for my father who | loves gardening and old movies."),
 ("fact","Which animal is known as | the king of the jungle?"),
 ("request","Tell me the quickest way to | get to the airport from here."),
 ("chat","If I leave now I could probably | catch the last train home."),
 ("fact","What is the main ingredient in | guacamole?"),
 ("request","Schedule a meeting with the team for | Tuesday afternoon at three."),
 ("chat","I can't remember whether I | locked the front door this morning."),
 ("fact","How many strings does | a standard guitar have?"),
 ("request","Translate good morning into | Spanish for me."),
 ("chat","The movie we saw last night was | much better than I expected."),
 ("fact","What is the smallest planet in | our solar system?"),
 ("request","Start a timer for | twenty five minutes so I can focus."),
 ("chat","What I really need right now is | a long holiday somewhere warm."),
 ("fact","Who painted | the Mona Lisa?"),
 ("request","Look up the opening hours of | the library on Sunday."),
 ("chat","We should probably | leave before the traffic gets bad."),
 ("fact","How many players are on | a soccer team on the field?"),
 ("request","Write down that I spent | forty dollars on groceries today."),
 ("chat","I keep forgetting to | water the plants on the balcony."),
 ("fact","At what temperature does | water freeze in Fahrenheit?"),
 ("request","Find a recipe that uses | chicken, rice and broccoli."),
 ("chat","Honestly I'm not sure if | I want to go to the party tonight."),
 ("fact","What is the largest mammal | that lives in the ocean?"),
 ("request","Can you check if | my package has been delivered yet?"),
 ("chat","My plan for tomorrow is to | finish the report and then go running."),
 ("fact","Which country has | the most people in the world?"),
]
import re
def slug(t):
    s=re.sub(r"[^a-z0-9]+","-",t.lower()).strip("-")
    return "-".join(s.split("-")[:7])
out=["""# The labelled turn-taking set for `atlas-voice eval --until-final` (issue 29): when does a
# turn end, and is anyone cut off?
#
# Generated by `scripts/turn_set.py` (edit the lists there and re-run it); spoken by the
# neural voice at evaluation time (`--voices piper`). Two labels:
#
# - finished questions and sentences (no `|`): the turn should end soon after the speech;
#   the end-of-turn delay is measured on these;
# - sentences with a pause mid-thought (`|`, silence of `pause_ms`, 600-900 ms): the turn
#   must not end at the pause; a final transcript before the speech ended is a cut-off.
#
# `kind` is as in prompts.toml; nothing here is checked for correctness (no `expect`).
"""]
ids=set()
for i,(k,t) in enumerate(complete):
    id="done-"+slug(t)
    assert id not in ids, id; ids.add(id)
    out.append(f'[[prompt]]\nid = "{id}"\nkind = "{k}"\ntext = "{t}"\n')
for i,(k,t) in enumerate(paused):
    id="pause-"+slug(t)
    assert id not in ids, id; ids.add(id)
    ms=600+ (i*7 % 31)*10  # 600..900 spread
    out.append(f'[[prompt]]\nid = "{id}"\nkind = "{k}"\ntext = "{t}"\npause_ms = {ms}\n')
print("\n".join(out),end="")
import sys
print(len(complete),len(paused),file=sys.stderr)
