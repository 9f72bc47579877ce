"""The rare-token identifier [V] and the two prompts of DreamBooth (Ruiz et al. 2023, §4.1).

"a [V] [class]" names the subject; "a [class]" names its kind (the class-prior images). A good [V] is one
token the model knows little about, so the LoRA can give it a meaning without fighting an old one.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from models.errors import EditError

# Words (and common abbreviations) of ≤ 3 letters the model already knows: never identifiers.
COMMON_WORDS = frozenset("""
a an the and or but if of to in on at by for with from up out off over as is it its be are was were am do did does
has had have not no yes so than then too very can will just all any few new old one two six ten day way man men boy
girl dog cat car sky sun sea red big top end art who why how what our you your she her him his they them we us me my
mine yet get got let put set see saw say said use run ran sit eat ate own try far few fun god guy hat bag box bed
cup cap toy key map pen pet pig cow ant bee bat owl fox rat egg ice oil tea air arm ear eye leg lip toe hip job kid
mom dad son bus van cab war law tax fan fee fit gas gun hot low mix net pay per pop raw row sad sex tie tip wet win
won via etc usa uk eu un tv pc cd dvd usb ok hi hey oh ah ha lol omg wow bro sir mr mrs ms dr st ave rd co inc ltd
pro con vs ii iii iv vi vii ix xi xl am pm id im ive ill ed al ai ml os ui ux js py go io ep lp mp uh um ya ye yo
jan feb mar apr may jun jul aug sep oct nov dec mon tue wed thu fri sat sun am be do go he me no of on or so to up us
we ace add age ago aid aim ale ape apt arc ark ash ask ate awe axe bad ban bar bay bet bid bin bit bow bun buy cod cog
cot cry cub cue cut dam den dew dig dim dip doc doe dot dry dub due dug dye ebb elf elk elm emu era eve ewe fad fat
fig fin fix flu fly foe fog fur gap gel gem gig gin gum gut hay hem hen hid hit hog hop hub hue hug hum hut ill imp
ink inn ion ivy jam jar jaw jet jog joy jug keg kin kit lab lad lag lap lay led lid lie lit log lot mad mat mob mop mud
mug nag nap nod nor nun nut oak oar oat odd ode opt orb ore owe pad pal pan pat paw pea peg pie pin pit ply pod pot
pub pun pup rag ram rap ray rib rid rig rim rip rob rod rot rub rug rum rut rye sag sap saw sew shy sin sip ski sky
sly sob sod sow soy spa spy sub sum tab tag tan tap tar tin ton tow tub tug urn van vat vet vow wag wax web wig wit
woe wok yak yam yap yaw yen yew zap zen zip zoo
""".split())


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _word(token: str) -> str | None:
    """The word of a whole-word vocabulary entry (CLIP's ``xyz</w>``, SentencePiece's ``▁xyz``), else None."""
    if token.endswith("</w>"):
        return token[:-4]
    return token[1:] if token.startswith("▁") else None


def suggest_identifiers(tokenizer, n: int = 5, avoid: Sequence[str] = ()) -> list[str]:
    """Rare-token identifiers, rarest first: ≤3 lowercase letters that the tokenizer maps to ONE token,
    not a common word. "Rare" = latest in the BPE merge order (highest id), i.e. least frequent in
    CLIP's training text, so the token carries a weak prior the LoRA can overwrite (DreamBooth §4.1).
    Works for byte-level BPE vocabularies (CLIP's ``xyz</w>`` word tokens) and char-level ones."""
    avoid = {a.lower() for a in avoid}
    cands = []
    for tok, idx in tokenizer.get_vocab().items():
        word = _word(tok)
        if (word and re.fullmatch(r"[a-z]{1,3}", word) and word not in COMMON_WORDS and word not in avoid
                and re.search(r"[bcdfghjklmnpqrstvwxz]", word)):  # a consonant: pronounceable, not a vowel cluster
            cands.append((len(word) >= 2, idx, word))
    cands.sort(reverse=True)  # multi-letter first (more distinctive), then rarest
    out = []
    in_context = _token_count(tokenizer, "a dog") + 1  # one token in a prompt too, not merged with neighbours
    for _, _, word in cands:
        if _token_count(tokenizer, word) == 1 and _token_count(tokenizer, f"a {word} dog") == in_context:
            out.append(word)
            if len(out) >= n:
                break
    return out


def pick_identifier(tokenizer, avoid: Sequence[str] = ()) -> str:
    """The rarest suitable identifier (see ``suggest_identifiers``)."""
    found = suggest_identifiers(tokenizer, 1, avoid)
    if not found:
        raise EditError("This tokenizer has no short single-token word to use as an identifier; type one.")
    return found[0]


def check_identifier(tokenizer, identifier: str, class_noun: str = "") -> tuple[str, list[str]]:
    """Validate a user's identifier -> (identifier, notices). Empty -> the automatic pick."""
    ident = (identifier or "").strip()
    if not ident:
        return pick_identifier(tokenizer, avoid=class_noun.split()), []
    if re.search(r"\s", ident):
        raise EditError(f"The identifier {ident!r} must be one word (no spaces), e.g. {pick_identifier(tokenizer)!r}.")
    if ident.lower() == class_noun.strip().lower():
        raise EditError("The identifier must differ from the class noun: it names *this* subject, the noun its kind.")
    notices = []
    n = _token_count(tokenizer, ident)
    if n != 1:
        notices.append(f"The identifier {ident!r} is {n} tokens; one rare token works best "
                       f"(suggestions: {', '.join(suggest_identifiers(tokenizer, 3))}).")
    if ident.lower() in COMMON_WORDS:
        notices.append(f"{ident!r} is a common word the model already knows, which fights the new subject.")
    return ident, notices


def instance_prompt(identifier: str, class_noun: str) -> str:
    """"a [V] [class]" (DreamBooth's instance prompt)."""
    return f"a {identifier} {class_noun}".strip()


def class_prompt(class_noun: str) -> str:
    """"a [class]" (prompt of the class-prior images)."""
    return f"a {class_noun}".strip()
